"""Plan-side helpers to learn *each* meter's outcome instead of bluesky's first failure.

The RunEngine turns the first failed Status of any group into a ``FailedStatus`` thrown
into the plan at its next message, whoever waits for it.  Plans that must report every
meter (the NTP gate's table, a scheduled start some meters refused) need the outcomes as
data (the fly's periodic NTP syncs have their own object, :mod:`plans._periodic`):

* :class:`Settling` wraps a device: ``trigger()``/``prepare()`` call the device's and
  return a status that finishes *successfully* once the device's own status is done,
  successfully or not.  The device's status is kept as ``.inner`` for the plan to read.
* :func:`tolerating` runs a sub-plan and records exceptions thrown into it (a failure of
  some *other* status the RunEngine reports late) instead of aborting it; used where the
  plan winds down after a failure and must still collect what every meter sent.
"""

import logging
from collections.abc import Callable, Generator
from typing import Any

from bluesky.utils import Msg
from ophyd.status import Status

logger = logging.getLogger(__name__)


class SettledStatus(Status):
    """Finishes successfully when ``inner`` finishes, whatever its outcome."""

    def __init__(self, obj: Any, inner: Any) -> None:
        super().__init__(obj=obj)
        self.inner = inner
        inner.add_callback(lambda _status: self.set_finished())

    @property
    def succeeded(self) -> bool:
        return bool(self.inner.done and self.inner.success)

    def error(self) -> BaseException | None:
        """The inner status's exception (None while running or on success)."""
        return exception_of(self.inner)


def exception_of(status: Any) -> BaseException | None:
    """A status's exception (None while running or on success)."""
    if not status.done or status.success:
        return None
    try:
        return status.exception(timeout=0)  # type: ignore[no-any-return]
    except Exception as exc:  # ophyd raises when no exception was stored
        return exc


class Settling:
    """``device`` seen through :class:`SettledStatus`: its failures become data, not aborts."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.parent = None

    @property
    def name(self) -> str:
        return str(self.device.name)

    def trigger(self) -> SettledStatus:
        return SettledStatus(self, self.device.trigger())

    def prepare(self, value: Any) -> SettledStatus:
        return SettledStatus(self, self.device.prepare(value))

    def __repr__(self) -> str:
        return f"Settling({self.device.name})"


def tolerating(
    plan: Generator[Msg, Any, Any],
    errors: list[BaseException],
    tolerate: Callable[[BaseException], bool] = lambda exc: isinstance(exc, Exception),
) -> Generator[Msg, Any, Any]:
    """Run ``plan``; an exception thrown in at one of its messages is appended to ``errors``
    (and the message's response becomes None) when ``tolerate(exc)``, else passed on."""
    response: Any = None
    while True:
        try:
            msg = plan.send(response)
        except StopIteration as stop:
            return stop.value
        try:
            response = yield msg
        except GeneratorExit:
            plan.close()
            raise
        except BaseException as exc:
            if not tolerate(exc):
                plan.close()
                raise
            logger.debug("tolerated %r at %s", exc, msg.command)
            errors.append(exc)
            response = None
