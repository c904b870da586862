"""Bluesky plans for SmartMeters: synchronized multi-meter recordings and long monitoring.

Plans (generators, usable from IPython and bluesky-queueserver):

* :func:`synchronized_fly` - many meters, one run, one NTP-confident common start (§6.4),
  one stream per meter plus its gaps and timing streams; optional ``cts``/``reqSamples``
  flow control (§5.1, §5.2).
* :func:`slotted_fly` - the same for many meters sharing one link, each sending in its own
  time slot (§5.3), with a slot plan that cannot overflow a ring buffer (§4.10) or the link.
* :func:`monitor` - low-rate readings (RMS, power, energy, frequency) every period for hours.
* :func:`fly_meters` - one run flying meters as prepared (no gate, no common start).

Stubs to compose your own: :mod:`plans.stubs` (``ntp_gate``, ``measure_host_offset``,
``schedule_start``, ``release``, ``snapshot_settings``, ``restore_settings``).  The pure
arithmetic behind them: :func:`choose_start` (the start instant) and :func:`plan_slots`.

Every plan checks all its arguments on its first ``next()``, before any message: errors
name the meter and the allowed values.  Errors: :class:`PlanArgumentError`,
:class:`NtpGateError`, :class:`StartScheduleError`, :class:`SlotPlanError`.
"""

from . import stubs
from ._errors import NtpGateError, PlanArgumentError, SlotPlanError, StartScheduleError
from ._fly import FlyInterruptedError, fly_meters, slotted_fly, synchronized_fly
from ._monitor import monitor
from ._rerun import rerun
from ._slots import MeterLoad, SlotPlan, plan_slots
from ._start import StartBudget, StartChoice, choose_start

__all__ = [
    "FlyInterruptedError",
    "MeterLoad",
    "NtpGateError",
    "PlanArgumentError",
    "SlotPlan",
    "SlotPlanError",
    "StartBudget",
    "StartChoice",
    "StartScheduleError",
    "choose_start",
    "fly_meters",
    "monitor",
    "plan_slots",
    "rerun",
    "slotted_fly",
    "stubs",
    "synchronized_fly",
]
