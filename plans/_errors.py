"""Errors raised by the plans.

Every message names the meter(s) concerned and, for a bad argument, the allowed values.
A meter's own failure (a refused ``sample``, a dropped connection) reaches the user as the
device's :class:`~smartmeter_ophyd.client.MeterError`, never as bluesky's bare
``FailedStatus`` whose text only repeats the status object.
"""

from collections.abc import Mapping, Sequence
from typing import Any


class PlanArgumentError(ValueError):
    """A plan argument is invalid; raised on the plan's first ``next()``, before any message."""


class NtpGateError(RuntimeError):
    """Some meters did not reach the NTP confidence limit within the allowed attempts.

    ``results`` maps each meter's name to its :class:`~plans.stubs.GateResult`; the message
    is a table of every meter's confidence per attempt.
    """

    def __init__(self, message: str, results: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.results = dict(results)


class StartScheduleError(RuntimeError):
    """No common start instant could be chosen, or a meter did not accept it (§6.4)."""

    def __init__(self, message: str, meters: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.meters = tuple(meters)


class SlotPlanError(PlanArgumentError):
    """A slotted configuration would overflow a meter's ring buffer or the shared link."""

    def __init__(self, message: str, meters: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.meters = tuple(meters)
