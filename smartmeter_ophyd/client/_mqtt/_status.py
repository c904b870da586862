"""The meters' idle status (protocol.md §8.2, §8.3): the latest per meter, waiters, subscribers.

A :class:`StatusBoard` keeps what the broker routes from ``powermeter/<name>/state/sample``:
the latest :class:`MeterStatus` and the last ``on``/``off`` per meter.  A status is sent only
while a meter is idle (§8.3), so a fresh one also says "not sampling".  No I/O: the broker
feeds it on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .._errors import MeterTimeoutError
from ._messages import MeterStatus

logger = logging.getLogger(__name__)


class StatusBoard:
    """Latest status and sampling flag per meter name; ``label(name)`` names a meter in errors."""

    def __init__(self, label: Callable[[str], str], timeout: float) -> None:
        self._label = label
        self.timeout = timeout
        self.statuses: dict[str, MeterStatus] = {}
        self.sampling: dict[str, bool] = {}
        self._callbacks: list[tuple[str | None, Callable[[MeterStatus], None]]] = []
        self._waiters: dict[str, list[asyncio.Future[MeterStatus]]] = {}

    def switched(self, name: str, on: bool) -> None:
        """The meter published ``on`` or ``off``."""
        self.sampling[name] = on

    def new_status(self, status: MeterStatus) -> None:
        self.statuses[status.meter] = status
        self.sampling[status.meter] = False  # only sent while idle (§8.3)
        for future in self._waiters.pop(status.meter, []):
            if not future.done():
                future.set_result(status)
        for meter, callback in list(self._callbacks):
            if meter is None or meter == status.meter:
                try:
                    callback(status)
                except Exception:
                    logger.exception("%s: status subscriber failed", self._label(status.meter))

    def subscribe(self, callback: Callable[[MeterStatus], None], *,
                  meter: str | None = None) -> Callable[[], None]:
        """``callback(status)`` for each status (of ``meter``, or of all); returns the undo."""
        entry = (meter, callback)
        self._callbacks.append(entry)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(entry)

        return unsubscribe

    async def next_status(self, name: str, *, timeout: float | None = None) -> MeterStatus:
        limit = self.timeout if timeout is None else timeout
        future: asyncio.Future[MeterStatus] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(name, [])
        waiters.append(future)
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise MeterTimeoutError(
                self._label(name),
                f"no MQTT status within {limit} s (sent every ~5 s, only while idle, §8.3)",
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(future)
