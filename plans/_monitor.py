"""``monitor``: long, low-rate logging of each meter's readings (hours, one event a period).

Every ``period`` seconds the meters are triggered together and read into one event of the
``primary`` stream: per line (L1-L3) the RMS voltage (V) and current (mA), active, reactive
and apparent power (W, var, VA), energy (Wh), frequency (Hz) and phase angle (deg) - what
``SmartMeter.trigger()`` asks the meter for (§3.10).

The readings are taken on a fixed schedule ``t0 + k * period`` (no drift over hours); a
reading that comes late (a slow meter, a pause) is followed by the next one still due, and
instants that passed meanwhile are skipped and logged, never filled in.  The firmware puts
no time in these replies, so each reading's timestamp is the host's receive time.  The
meters must not be sampling (§2.8: commands are refused while they do).  ``getEnergy``
resets the ADE accumulators (§12 #11), so each energy value covers the time since the
previous reading.  A meter that fails to answer fails the run, naming it.
"""

import logging
import math
import time
from collections.abc import Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg

from smartmeter_ophyd.devices import SmartMeter

from . import _validate as check

logger = logging.getLogger(__name__)

MIN_MONITOR_PERIOD_S = 0.5
"""A reading is about eight command round trips (§3.10); faster is not a monitor."""


def monitor(
    meters: Sequence[SmartMeter],
    period: float = 10.0,
    duration: float = 3600.0,
    *,
    md: dict[str, Any] | None = None,
) -> Generator[Msg, Any, str]:
    """Read every meter every ``period`` seconds for ``duration`` seconds, in one run.

    Parameters
    ----------
    meters : list of SmartMeter
    period : float
        Seconds between readings (>= 0.5).
    duration : float
        Seconds to monitor; readings at 0, period, 2 period, ... up to ``duration``.
    md : dict, optional
        Metadata for the start document.

    Returns the run's uid.
    """
    plan = "monitor"
    meters = check.meter_list(meters, plan, parts=check.READ_METER_PARTS)
    period = check.number(period, "period", plan, minimum=MIN_MONITOR_PERIOD_S)
    duration = check.number(duration, "duration", plan, minimum=0.0, exclusive_minimum=True)
    user_md = check.metadata(md, plan)
    readings = math.floor(duration / period + 1e-9) + 1
    run_md: dict[str, Any] = {
        "plan_name": plan,
        "plan_args": {"meters": [m.name for m in meters], "period": period,
                      "duration": duration},
        "detectors": [m.name for m in meters],
        "num_points": readings,
        "meters": {m.name: m.run_metadata() for m in meters if hasattr(m, "run_metadata")},
        "hints": {"dimensions": [(("time",), "primary")]},
    }
    run_md.update(user_md)

    def readings_on_schedule() -> Generator[Msg, Any, None]:
        t0 = time.time()
        k = 0
        while k < readings:
            yield from bps.checkpoint()
            yield from bps.trigger_and_read(list(meters), name="primary")
            due = max(k + 1, math.ceil((time.time() - t0) / period))
            if due > k + 1:
                logger.warning("monitor: reading %d took too long; %d scheduled readings "
                               "skipped", k, due - k - 1)
            k = due
            if k < readings:
                wait = t0 + k * period - time.time()
                if wait > 0:
                    yield from bps.sleep(wait)

    staged = bpp.stage_wrapper(bpp.run_wrapper(readings_on_schedule(), md=run_md), meters)
    return (yield from staged)
