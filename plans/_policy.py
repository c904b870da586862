"""What a fly does when a meter's link fails mid-run: the user's per-fault policy.

``on_fault="fail"`` (the default) fails the run loudly: the other meters are stopped,
everything received is collected and the run closes with the meter's own error.
``on_fault="continue"`` continues after a *lost connection* (the meter rebooted, the cable
or WiFi dropped, §4.9): every meter is stopped and what arrived is recorded as a segment,
the plan waits (bounded) until the lost meter's link is back, then records the rest of the
duration as a new synchronized segment (gated and scheduled again), exactly as after a
pause.  The boundary and the gap are in the run: the ``synchronization`` and
``meter_summary`` tables have one row per meter and segment (``segment`` 0, 1, ...; each
meter's ``start_ts``/``stop_ts``), and the failed segment's summary says why it ended.  Any other fault (a write error, a refused command, a
timeout) still fails the run, under either policy.

Limits: the meter must come back at the same address within ``RECONNECT_S``; a meter that
rebooted lost the samples still in its buffer (§4.9), which its summary declares as not
received (never filled in).
"""

import logging
import time
from collections.abc import Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import Msg

from smartmeter_ophyd.client import MeterConnectionError, MeterIdentityError

from ._errors import PlanArgumentError

logger = logging.getLogger(__name__)

POLICIES = ("fail", "continue")
RECONNECT_S = 30.0
"""How long ``continue`` waits for a lost meter's link to come back."""


def check_policy(value: Any, plan: str) -> str:
    """``value`` if it names a policy, else a :class:`PlanArgumentError` naming the choices."""
    if value not in POLICIES:
        raise PlanArgumentError(
            f"{plan}: on_fault={value!r} is not a fault policy; choose one of {POLICIES}"
        )
    return str(value)


def continues(policy: str, cause: BaseException) -> bool:
    """Whether ``policy`` continues after ``cause``: a lost connection, not another meter."""
    return (policy == "continue" and isinstance(cause, MeterConnectionError)
            and not isinstance(cause, MeterIdentityError))


def stop_and_wait_for_links(
    meters: Sequence[Any], completes: dict[str, Any], timeout: float = RECONNECT_S
) -> Generator[Msg, Any, None]:
    """Stop the meters still sampling, wait for every fly to end, then (bounded) for every
    meter's link to be ``connected`` again; raises ``TimeoutError`` naming the missing ones."""
    for meter in meters:
        status = completes.get(meter.name)
        if status is not None and not status.done:
            yield from bps.stop(meter)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flying = [s for s in completes.values() if not s.done]
        lost = [m for m in meters if m.link_state.get() != "connected"]
        if not flying and not lost:
            return
        yield from bps.sleep(0.2)
    lost = [getattr(m, "meter_label", m.name) for m in meters
            if m.link_state.get() != "connected"]
    raise TimeoutError(f"on_fault='continue': no link to {', '.join(lost) or 'the meters'} "
                       f"within {timeout:g} s; the run ends here")
