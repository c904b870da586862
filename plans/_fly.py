"""``synchronized_fly`` and ``slotted_fly``: one run, many meters, one NTP-confident start.

The sequence (each step a stub of :mod:`plans.stubs` or a few messages here):

1. **validate** every argument (zero messages on failure);
2. **stage** the meters (connect); ``unstage`` in a ``finalize_wrapper`` leaves every meter
   idle however the plan ends - error, ``RE.abort()``, ``RE.stop()``, Ctrl-C;
3. **NTP gate** (:func:`~plans.stubs.ntp_gate`) and the **host offset**
   (:func:`~plans.stubs.measure_host_offset`); with a scheduled start the offset is checked
   against every meter's window at once, so a host clock off too far fails here, before
   any ``sample`` is sent;
4. **prepare** stores each meter's settings (nothing is sent), then the run opens with the
   gate, the host offset and each meter's identity in the start document, and every stream
   is declared: ``<meter>`` (samples), ``<meter>_gaps``, ``<meter>_timing`` (the meter's
   sync records, §6.5);
5. **schedule** (:func:`~plans.stubs.schedule_start`): one start ``T`` for all, every meter
   armed concurrently and checked (``start_in=0``: no common instant, each meter starts
   when its kickoff reaches it);
6. **release** (kickoff all), then **complete** all while collecting every ``flush_period``
   and triggering each meter's NTP every ``ntp_period`` (§6.5: the firmware never syncs on
   its own on Ethernet, §6.2, so without this there are no drift records);
7. final collects, the ``synchronization`` table (gate, host offset, ``T``, the replies'
   ``startTs``, the confidence of the sync the meter ran inside ``sample``) and the
   ``meter_summary`` table (the stop replies' ``start_ts``/``stop_ts``, samples,
   sent_samples, received, gaps, the meter's state after the fly): long tables, one row
   per meter (``meter`` and ``segment`` columns), each collected as one event page, so
   their cost does not grow with the fleet's width (see :data:`SYNC_COLUMNS`).

When a meter fails mid-run the others are stopped, everything received is still collected
and summarised, and the run closes with the *meter's* error as its reason.

Pause and resume (Ctrl-C, ``RE.request_pause()``, a suspender): the meters' devices stop
their flies when the RunEngine pauses (their ``pause()``), so what they sent is recorded.
A pause while the meters stream resumes as a new *segment*: the plan gates on NTP again,
schedules a new common start for the rest of the duration and records it in the same
streams; the ``synchronization`` and ``meter_summary`` tables get one row per meter and
segment (``segment`` 0, 1, ...).  Arming and releasing are never replayed (a replay could re-send
``sample``, §6.4): a pause there fails the run with :class:`FlyInterruptedError` once resumed.
"""

import logging
import math
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import FailedPause, FailedStatus, Msg, short_uid

from smartmeter_ophyd.devices import (
    AlignmentStream,
    FlyConfig,
    HostClock,
    MeterSummary,
    SmartMeter,
    TableColumn,
    TableStream,
)
from smartmeter_ophyd.protocol import Measures

from . import _policy, stubs
from . import _validate as check
from ._errors import PlanArgumentError
from ._periodic import PeriodicSync
from ._settle import tolerating
from ._slots import MeterLoad, SlotPlan, plan_slots
from ._start import StartBudget, choose_start

logger = logging.getLogger(__name__)

MIN_NTP_PERIOD_S = 1.0
"""Each sync blocks the meter's main loop up to 200 ms (§6.2); more often is pointless."""
MIN_FLUSH_PERIOD_S = 0.05
WIND_DOWN_S = 15.0
"""After a failure, how long the plan waits for the other meters to stop and flush (§4.8)."""


class FlyInterruptedError(RuntimeError):
    """A pause came while the meters were being armed or released; the fly cannot go on."""


INTERRUPTED = (
    "a synchronized fly cannot resume from a pause while its meters are being armed or "
    "released: a replay would re-send `sample` (§6.4). Every meter was stopped and what it "
    "sent is recorded; start a new run (a pause while the meters stream resumes as a new "
    "synchronized segment)"
)


# ------------------------------------------------------------------------ the arguments


@dataclass(frozen=True)
class FlySetup:
    """Everything a fly plan was asked to do, validated."""

    plan: str
    meters: tuple[SmartMeter, ...]
    configs: dict[str, FlyConfig]
    """Per meter, what ``prepare`` stores before the run (no start time, nothing sent)."""
    armed: dict[str, FlyConfig]
    """Per meter, what the arming ``prepare`` gets (``schedule_start`` adds ``start_time``)."""
    scheduled: bool
    start_in: float | None
    ntp_confidence_ms: float
    ntp_attempts: int
    ntp_period: float | None
    host_clock: HostClock | None
    flush_period: float
    md: dict[str, Any]
    plan_args: dict[str, Any]
    slot_plan: SlotPlan | None = None
    budget: StartBudget = field(default_factory=StartBudget)
    synchronization: bool = True
    """Whether the run gets the ``synchronization`` event (not for :func:`fly_meters`)."""
    alignment: bool = True
    """Whether a multi-meter run gets the ``alignment`` stream at its end."""
    on_fault: str = "fail"
    """What a lost connection mid-run does: ``"fail"`` or ``"continue"`` (see ``_policy``)."""

    @property
    def arms(self) -> bool:
        """Whether ``sample`` is sent in ``prepare`` (scheduled, or released by the plan)."""
        return any(config.arms_in_prepare for config in self.armed.values())


def _start_in(value: Any, plan: str) -> tuple[bool, float | None]:
    """``(scheduled, start_in)``: None = earliest safe instant; 0 = immediate start."""
    if value is None:
        return True, None
    if not isinstance(value, bool) and isinstance(value, int | float) and value == 0:
        return False, None
    return True, check.number(value, "start_in", plan, minimum=0.5, maximum=20.0,
                              exclusive_minimum=True)


def _common(
    plan: str,
    meters: Any,
    duration: Any,
    *,
    start_in: Any,
    ntp_confidence_ms: Any,
    ntp_attempts: Any,
    ntp_period: Any,
    host_clock: Any,
    flush_period: Any,
    md: Any,
) -> dict[str, Any]:
    meters = check.meter_list(meters, plan)
    check.number(duration, "duration", plan, minimum=0.0, exclusive_minimum=True)
    scheduled, start_in = _start_in(start_in, plan)
    confidence = check.number(ntp_confidence_ms, "ntp_confidence_ms", plan, minimum=0.0,
                              maximum=200.0, exclusive_minimum=True)
    attempts = check.integer(ntp_attempts, "ntp_attempts", plan, minimum=1, maximum=100)
    period = None if ntp_period is None else check.number(
        ntp_period, "ntp_period", plan, minimum=MIN_NTP_PERIOD_S)
    if host_clock is not None:
        for part in ("trigger", "offset_s", "delay_s", "name"):
            if not hasattr(host_clock, part):
                raise PlanArgumentError(f"{plan}: host_clock={host_clock!r} is not a HostClock "
                                        f"(no {part}); give a HostClock or None")
    flush = check.number(flush_period, "flush_period", plan, minimum=MIN_FLUSH_PERIOD_S,
                         maximum=60.0)
    return {
        "meters": meters, "scheduled": scheduled, "start_in": start_in,
        "ntp_confidence_ms": confidence, "ntp_attempts": attempts, "ntp_period": period,
        "host_clock": host_clock, "flush_period": flush, "md": check.metadata(md, plan),
    }


def _measures_checked(plan: str, scheduled: bool) -> Any:
    def measures(value: Any, meter: Any) -> Measures:
        mode = check.measures_of(value, meter, plan)
        if scheduled and mode.latched:
            raise PlanArgumentError(
                f"{plan}: {check.label(meter)}: measures {mode.request!r} is latched; a scheduled "
                "start samples the raw waveform path instead and labels it as "
                f"{mode.reported!r} (§6.4 step 4); use start_in=0 (immediate) or monitor()"
            )
        return mode
    return measures


def _plan_args(**kwargs: Any) -> dict[str, Any]:
    """``plan_args`` for the start document: meters and devices by name, the rest as given."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "meters":
            out[key] = [getattr(m, "name", repr(m)) for m in value]
        elif key == "host_clock":
            out[key] = None if value is None else getattr(value, "name", repr(value))
        elif isinstance(value, Mapping):
            out[key] = {str(getattr(k, "name", k)): v for k, v in value.items()}
        else:
            out[key] = value
    return out


def _fly_setup(plan: str, meters: Any, duration: Any, *, rate: Any, measures: Any,
               transport: Any, flow_control: Any, request_size: Any,
               slot_plan_args: dict[str, Any] | None, **common: Any) -> FlySetup:
    args = _common(plan, meters, duration, **common)
    meters = args["meters"]
    scheduled = args["scheduled"]
    mode = check.flow_control_of(flow_control, plan)
    kind = check.transport_of(transport, plan)
    modes = check.per_meter(measures, meters, "measures", plan, _measures_checked(plan, scheduled))
    rates = check.per_meter(rate, meters, "rate", plan, lambda value, _meter: value)
    slot_plan = None
    if slot_plan_args is not None:
        loads = {}
        for meter in meters:
            # the codec's rate check first, so a bad rate is named as such, not as a load
            check.fly_config(meter, plan, rate=rates[meter.name], measures=modes[meter.name])
            loads[meter.name] = MeterLoad(rates[meter.name], modes[meter.name])
        slot_plan = plan_slots(loads, **slot_plan_args)
    configs: dict[str, FlyConfig] = {}
    armed: dict[str, FlyConfig] = {}
    for meter in meters:
        settings: dict[str, Any] = {
            "rate": rates[meter.name],
            "measures": modes[meter.name],
            "transport": kind,
            "flow_control": mode,
            "duration_s": float(duration),
            "request_size": check.request_size_of(request_size, mode, modes[meter.name], meter,
                                                  plan),
        }
        if slot_plan is not None:
            settings["slot"] = slot_plan.slot_of(meter.name)
        configs[meter.name] = check.fly_config(meter, plan, **settings)
        if mode == "cts":
            # paused at the start, released by the plan for all meters together (§5.1)
            armed[meter.name] = check.fly_config(meter, plan, **settings, release="plan")
        else:
            armed[meter.name] = configs[meter.name]
    return FlySetup(
        plan=plan, meters=meters, configs=configs, armed=armed, scheduled=scheduled,
        start_in=args["start_in"], ntp_confidence_ms=args["ntp_confidence_ms"],
        ntp_attempts=args["ntp_attempts"], ntp_period=args["ntp_period"],
        host_clock=args["host_clock"], flush_period=args["flush_period"], md=args["md"],
        plan_args={}, slot_plan=slot_plan,
    )


# --------------------------------------------------------------------------- the plans


def synchronized_fly(
    meters: Sequence[SmartMeter],
    duration: float,
    *,
    rate: int | Mapping[str, int] = 8000,
    measures: str | Mapping[str, str] = "v,i,v,i,v,i",
    transport: str = "TCP",
    start_in: float | None = None,
    ntp_confidence_ms: float = 5.0,
    ntp_attempts: int = 3,
    ntp_period: float | None = 60.0,
    flow_control: str | None = None,
    request_size: int | None = None,
    host_clock: HostClock | None = None,
    flush_period: float = 0.5,
    md: dict[str, Any] | None = None,
    on_fault: str = "fail",
    alignment: bool = True,
) -> Generator[Msg, Any, str]:
    """Record ``meters`` for ``duration`` seconds in one run, all starting on one instant.

    Parameters
    ----------
    meters : list of SmartMeter
        Each is recorded into its own stream, named after the meter.
    duration : float
        Seconds of samples per meter (the meter is stopped after ``duration * rate``
        samples; its tail may add a few, all recorded, §4.8).
    rate, measures : int / str, or a mapping from meter name to value
        Sampling rate in Hz (a divisor of 32000, §4.3) and measures (§4.2) per meter.
        Latched measures (``"p,q"``, ``"v,i_RMS"``) need ``start_in=0`` (§6.4 step 4).
    transport : {"TCP", "UDP"}
    start_in : float or None
        Seconds until the common start (0.5 < x <= 20); None picks the earliest instant
        every meter's window allows (§6.4); 0 starts each meter at its kickoff (no common
        instant, but still gated on NTP).
    ntp_confidence_ms, ntp_attempts : float, int
        The NTP gate: every meter's confidence must reach at most ``ntp_confidence_ms``
        within ``ntp_attempts`` syncs, or the plan fails before any sample is sent.
    ntp_period : float or None
        Seconds between NTP syncs of each meter during the run (>= 1; None: none): at least
        this long from one trigger to the next (the plan looks once a ``flush_period``).
    flow_control : {None, "cts", "reqSamples"}
        None streams freely; ``"cts"`` starts every meter paused and releases them together;
        ``"reqSamples"`` pulls ``request_size`` samples at a time (at most 42 for 24-byte
        measures, 128 for 8-byte; default the largest, §5.2).
    host_clock : HostClock or None
        Measures the host clock against the time server; None takes the host clock as right.
    flush_period : float
        Seconds between collects while the meters run.
    md : dict, optional
        Metadata for the start document.
    on_fault : {"fail", "continue"}
        A meter's lost connection fails the run (``"fail"``), or every meter is stopped,
        the plan waits for the link and records the rest as a new segment (``"continue"``).
    alignment : bool
        With several meters, the run ends with its ``alignment`` stream: each meter's
        residual offset against the first, measured on the L1 voltages (worker processes,
        about 25 ms of CPU per meter and 10 s of 8 kHz data; they follow the files as they
        close).  False closes the run without it; ``storage.align_recordings`` computes it
        later from the files the ``meter_summary`` table names.

    Returns the run's uid.
    """
    plan = "synchronized_fly"
    on_fault = _policy.check_policy(on_fault, plan)
    align = check.flag(alignment, "alignment", plan)
    setup = _fly_setup(
        plan, meters, duration, rate=rate, measures=measures, transport=transport,
        flow_control=flow_control, request_size=request_size, slot_plan_args=None,
        start_in=start_in, ntp_confidence_ms=ntp_confidence_ms, ntp_attempts=ntp_attempts,
        ntp_period=ntp_period, host_clock=host_clock, flush_period=flush_period, md=md,
    )
    setup = replace(setup, plan_args=_plan_args(
        meters=setup.meters, duration=duration, rate=rate, measures=measures,
        transport=transport, start_in=start_in, ntp_confidence_ms=ntp_confidence_ms,
        ntp_attempts=ntp_attempts, ntp_period=ntp_period, flow_control=flow_control,
        request_size=request_size, host_clock=host_clock, flush_period=flush_period,
        on_fault=on_fault, alignment=align,
    ), on_fault=on_fault, alignment=align)
    return (yield from fly(setup))


def slotted_fly(
    meters: Sequence[SmartMeter],
    duration: float,
    *,
    rate: int | Mapping[str, int] = 8000,
    measures: str | Mapping[str, str] = "v,i,v,i,v,i",
    link_mbps: float = 10.0,
    meter_mbps: float = 8.0,
    slots: int | None = None,
    buffer_fraction: float = 0.5,
    start_in: float | None = None,
    ntp_confidence_ms: float = 5.0,
    ntp_attempts: int = 3,
    ntp_period: float | None = 60.0,
    host_clock: HostClock | None = None,
    flush_period: float = 0.5,
    md: dict[str, Any] | None = None,
    alignment: bool = True,
) -> Generator[Msg, Any, str]:
    """:func:`synchronized_fly` for many meters sharing one link: each sends in its slot.

    Every meter gets ``slot = [slot, slots]`` (§5.3): it samples continuously and sends only
    during the seconds where ``second % slots == slot``.  The slot plan comes from each
    meter's data rate, ``link_mbps`` (what the shared link carries, megabit/s),
    ``meter_mbps`` (what one meter can send within its slot; an allowance, measure yours)
    and ``buffer_fraction`` of the 3 670 016-byte ring buffer (§4.10) a meter may fill
    between its slots.  A configuration that would overflow a ring buffer (the firmware
    reboots), a meter's sending or the link is refused before anything is sent, with the
    figures.  ``slots`` forces the number of slots.  TCP only: the slot writer sends to the
    TCP sink whatever the transport (§5.3).  The chosen plan is in the start document
    (``slot_plan``).  Other parameters as in :func:`synchronized_fly`.
    """
    plan = "slotted_fly"
    align = check.flag(alignment, "alignment", plan)
    link = check.number(link_mbps, "link_mbps", plan, minimum=0.0, exclusive_minimum=True)
    meter_rate = check.number(meter_mbps, "meter_mbps", plan, minimum=0.0,
                              exclusive_minimum=True)
    fraction = check.number(buffer_fraction, "buffer_fraction", plan, minimum=0.0, maximum=1.0,
                            exclusive_minimum=True)
    if slots is not None:
        count = len(meters) if isinstance(meters, Sequence) else 1
        check.integer(slots, "slots", plan, minimum=1, maximum=max(1, count))
    setup = _fly_setup(
        plan, meters, duration, rate=rate, measures=measures, transport="TCP",
        flow_control=None, request_size=None,
        slot_plan_args={"link_bytes_per_s": link * 1e6 / 8,
                        "meter_bytes_per_s": meter_rate * 1e6 / 8,
                        "buffer_fraction": fraction, "slots": slots},
        start_in=start_in, ntp_confidence_ms=ntp_confidence_ms, ntp_attempts=ntp_attempts,
        ntp_period=ntp_period, host_clock=host_clock, flush_period=flush_period, md=md,
    )
    setup = replace(setup, plan_args=_plan_args(
        meters=setup.meters, duration=duration, rate=rate, measures=measures,
        link_mbps=link_mbps, meter_mbps=meter_mbps, slots=slots, buffer_fraction=buffer_fraction,
        start_in=start_in, ntp_confidence_ms=ntp_confidence_ms, ntp_attempts=ntp_attempts,
        ntp_period=ntp_period, host_clock=host_clock, flush_period=flush_period,
        alignment=align,
    ), alignment=align)
    return (yield from fly(setup))


def fly_meters(
    meters: Sequence[SmartMeter],
    config: FlyConfig | dict[str, Any] | None = None,
    *,
    flush_period: float = 0.5,
    md: dict[str, Any] | None = None,
) -> Generator[Msg, Any, str]:
    """One run that flies ``meters`` as each one is prepared: no NTP gate, no common start.

    ``config`` (a :class:`FlyConfig` or a mapping) is given to every meter's ``prepare``
    first; None flies them as already prepared.  A ``start_time`` in it arms every meter for
    that instant (§6.4).  Streams: ``<meter>``, ``<meter>_gaps``, ``<meter>_timing`` per
    meter and one ``meter_summary`` event.  Meters are staged (connected) and unstaged, so an
    abort leaves them idle.  For meters that must start together, use
    :func:`synchronized_fly`.  Returns the run's uid.
    """
    plan = "fly_meters"
    meters = check.meter_list(meters, plan)
    if config is not None:
        for meter in meters:
            check.fly_config(meter, plan, **(
                config.as_dict() if isinstance(config, FlyConfig) else dict(config)))
    flush = check.number(flush_period, "flush_period", plan, minimum=MIN_FLUSH_PERIOD_S,
                         maximum=60.0)
    user_md = check.metadata(md, plan)

    def body() -> Generator[Msg, Any, str]:
        if config is not None:
            group = short_uid(label="prepare")
            for meter in meters:
                yield from bps.prepare(meter, config, group=group)
            yield from bps.wait(group=group)
        run_md: dict[str, Any] = {
            "plan_name": plan,
            "plan_args": {"meters": [m.name for m in meters], "flush_period": flush},
            "detectors": [m.name for m in meters],
            "meters": {m.name: m.run_metadata() for m in meters},
            "streams": {m.name: dict(zip(("samples", "gaps", "timing"), stream_names(m),
                                         strict=True)) for m in meters},
        }
        run_md.update(user_md)
        setup = FlySetup(
            plan=plan, meters=meters, configs={}, armed={}, scheduled=False, start_in=None,
            ntp_confidence_ms=math.inf, ntp_attempts=0, ntp_period=None, host_clock=None,
            flush_period=flush, md=user_md, plan_args=run_md["plan_args"],
            synchronization=False,
        )
        return (yield from bpp.run_wrapper(_in_run(setup, FlyState(), arm=False), md=run_md))

    return (yield from bpp.stage_wrapper(body(), meters))


# ---------------------------------------------------------------------- the fly itself


@dataclass
class FlyState:
    """What the run did so far, for the records and for winding down after a failure."""

    gate: dict[str, stubs.GateResult] = field(default_factory=dict)
    host: stubs.HostOffset | None = None
    schedule: stubs.Schedule | None = None
    armed: bool = False
    kickoffs: dict[str, Any] = field(default_factory=dict)
    completes: dict[str, Any] = field(default_factory=dict)
    periodic: PeriodicSync | None = None
    periodic_group: str = field(default_factory=lambda: short_uid(label="ntp"))
    segment: int = 0
    """0 for the first recording; +1 for each one after a pause and resume."""
    watch: "PauseWatch" = field(default_factory=lambda: PauseWatch())
    sync_table: TableStream = field(default_factory=lambda: sync_table())
    summary_table: MeterSummary = field(default_factory=MeterSummary)


def fly(setup: FlySetup) -> Generator[Msg, Any, str]:
    """Run a validated :class:`FlySetup` (see the module docstring for the sequence)."""
    reference = _alignment_reference(setup)
    if reference is not None:
        # every other meter's alignment waits for the reference's file: finish it first
        setup = replace(
            setup,
            configs={**setup.configs,
                     reference: replace(setup.configs[reference], finish_first=True)},
            armed={**setup.armed,
                   reference: replace(setup.armed[reference], finish_first=True)},
        )
    state = FlyState()
    body = _before_run(setup, state)
    return (yield from bpp.stage_wrapper(body, setup.meters))


def _before_run(setup: FlySetup, state: FlyState) -> Generator[Msg, Any, str]:
    meters = setup.meters
    state.gate = yield from stubs.ntp_gate(meters, setup.ntp_confidence_ms, setup.ntp_attempts)
    if setup.host_clock is not None:
        state.host = yield from stubs.measure_host_offset(setup.host_clock)
        logger.info("host clock offset %+.4f s (delay %.4f s) against %s", state.host.offset_s,
                    state.host.delay_s, state.host.source)
    if setup.scheduled:
        # a dry run of the choice: a host clock off beyond the window fails here, not later
        choose_start(time.time(), _gate_confidences(state), **_offset_kwargs(state),
                           start_in=setup.start_in, budget=setup.budget)
    group = short_uid(label="configure")
    for meter in meters:
        yield from bps.prepare(meter, setup.configs[meter.name], group=group)
    yield from bps.wait(group=group)
    md = _start_document(setup, state)
    return (yield from bpp.run_wrapper(_in_run(setup, state), md=md))


def _gate_confidences(state: FlyState) -> dict[str, float]:
    return {name: float(result.confidence_ms) for name, result in state.gate.items()
            if result.confidence_ms is not None}


def _offset_kwargs(state: FlyState) -> dict[str, float]:
    if state.host is None:
        return {"host_offset_s": 0.0, "host_offset_uncertainty_s": 0.0}
    return {"host_offset_s": state.host.offset_s,
            "host_offset_uncertainty_s": state.host.uncertainty_s}


def stream_names(meter: Any) -> tuple[str, str, str]:
    """The samples, gaps and timing streams of ``meter``."""
    return meter.name, f"{meter.name}_gaps", f"{meter.name}_timing"


def _start_document(setup: FlySetup, state: FlyState) -> dict[str, Any]:
    md: dict[str, Any] = {
        "plan_name": setup.plan,
        "plan_args": setup.plan_args,
        "detectors": [m.name for m in setup.meters],
        "meters": {m.name: m.run_metadata() for m in setup.meters},
        "streams": {m.name: dict(zip(("samples", "gaps", "timing"), stream_names(m), strict=True))
                    for m in setup.meters},
        "synchronization": {
            "scheduled": setup.scheduled,
            "start_in": setup.start_in,
            "ntp_confidence_ms": setup.ntp_confidence_ms,
            "ntp_attempts": setup.ntp_attempts,
            "ntp_period_s": setup.ntp_period,
            "gate": {name: result.as_dict() for name, result in state.gate.items()},
            "host_clock": state.host.as_dict() if state.host is not None else None,
            "budget": {
                "link_latency_s": setup.budget.link_latency_s,
                "dispatch_s": setup.budget.dispatch_s,
                "dispatch_per_meter_s": setup.budget.dispatch_per_meter_s,
                "pre_start_wait_s": setup.budget.pre_start_wait_s,
                "sample_ntp_s": setup.budget.sample_ntp_s,
            },
        },
        # The live view is what callbacks table and plot, against time; hinting each meter's
        # own stream would name several streams, which BestEffortCallback refuses (with a
        # warning) and falls back from.
        "hints": {"dimensions": [(("time",), "primary")]},
    }
    if setup.slot_plan is not None:
        md["slot_plan"] = setup.slot_plan.as_dict()
    md.update(setup.md)
    return md


def _alignment_reference(setup: FlySetup) -> str | None:
    """The meter the ``alignment`` stream aligns the others against (None: no stream)."""
    return setup.meters[0].name if setup.alignment and len(setup.meters) > 1 else None


def _in_run(setup: FlySetup, state: FlyState, *, arm: bool = True) -> Generator[Msg, Any, None]:
    meters = setup.meters
    for meter in meters:
        samples, gaps, timing = stream_names(meter)
        yield from bps.declare_stream(meter, name=samples, collect=True)
        yield from bps.declare_stream(meter.gap_stream, name=gaps, collect=True)
        yield from bps.declare_stream(meter.timing_stream, name=timing, collect=True)
    reference = _alignment_reference(setup)
    alignment = AlignmentStream(meters, reference) if reference is not None else None
    try:
        yield from _segments(setup, state, alignment, arm=arm)
    finally:
        if alignment is not None:
            alignment.close()


def _segments(setup: FlySetup, state: FlyState, alignment: AlignmentStream | None, *,
              arm: bool) -> Generator[Msg, Any, None]:
    yield Msg("null", state.watch)  # the RunEngine now tells it when it pauses
    try:
        while True:
            # Arming and releasing are never replayed (a replay could re-send `sample`, §6.4):
            # a pause meanwhile stops the meters and the plan fails once resumed.
            state.watch.phase = "arming"
            yield Msg("rewindable", None, False)
            if arm:
                yield from _arm(setup, state)
            yield from _release(setup, state)
            if state.watch.interrupted:
                raise FlyInterruptedError(INTERRUPTED)
            yield Msg("rewindable", None, True)
            state.watch.phase = "streaming"
            state.watch.paused = False
            try:
                yield from _complete_while_collecting(setup, state, alignment)
            except Exception as exc:
                if not (arm and _policy.continues(setup.on_fault, _cause(exc))):
                    raise
                logger.warning("%s: %s; on_fault='continue': a new segment after reconnect",
                               setup.plan, _cause(exc))
                yield from _policy.stop_and_wait_for_links(setup.meters, state.completes)
                state.watch.paused = True  # as after a pause: record, then sample the rest
            if not (arm and state.watch.paused):
                break
            # Paused (the meters stopped, what they sent is recorded) and resumed: record this
            # segment, then sample the rest of the duration as a new synchronized segment.
            remaining = _remaining(setup, state)
            if not remaining:
                break
            yield from _segment_records(setup, state)
            setup, state = yield from _next_segment(setup, state, remaining)
    except GeneratorExit:
        raise
    except BaseException as exc:
        cause = _cause(exc)
        logger.error("%s failed: %s; stopping every meter and recording what arrived",
                     setup.plan, str(cause) or type(cause).__name__)
        errors: list[BaseException] = []
        yield from tolerating(_wind_down(setup, state, alignment), errors)
        for error in errors:
            logger.warning("while winding down %s: %s", setup.plan, _cause(error))
        if isinstance(exc, FlyInterruptedError):
            raise
        if state.watch.interrupted or isinstance(exc, FailedPause):
            raise FlyInterruptedError(INTERRUPTED) from exc
        if cause is exc:
            raise
        raise cause from exc
    yield from _final(setup, state, alignment)


class PauseWatch:
    """Told by the RunEngine when it pauses or suspends (``Pausable``): the meters' devices
    stop their flies then, and the plan must know the segment ended early."""

    def __init__(self) -> None:
        self.name = "pause_watch"
        self.parent = None
        self.phase = "setup"
        self.paused = False
        self.interrupted = False
        """A pause came while the meters were being armed or released."""
        self.pauses = 0

    def pause(self) -> None:
        self.paused = True
        self.interrupted = self.interrupted or self.phase == "arming"
        self.pauses += 1

    def resume(self) -> None:
        """Nothing to do here: the plan starts the next segment when it runs again."""


def _remaining(setup: FlySetup, state: FlyState) -> float:
    """Seconds still to record after a segment cut short: the duration minus what the meter
    that sampled least has done so far (its stop reply's ``stop_ts - start_ts``, meter time);
    0 when nothing is left."""
    left = -math.inf
    for meter in setup.meters:
        config = setup.configs[meter.name]
        summary = getattr(meter, "last_summary", None)
        done = 0.0
        if summary is not None and summary.stop_ts is not None and summary.start_ts is not None:
            done = max(0.0, float(summary.stop_ts) - float(summary.start_ts))
        elif summary is not None:  # no stop reply (connection lost): what arrived
            done = (summary.received_samples + summary.missing_declared) / config.rate
        left = max(left, (config.duration_s or 0.0) - done)
    rate = max(config.rate for config in setup.configs.values())
    return left if math.isfinite(left) and left * rate >= 1 else 0.0


def _segment_records(setup: FlySetup, state: FlyState) -> Generator[Msg, Any, None]:
    yield from _collect_all(setup.meters)
    yield from _write_tables(setup, state)


def _next_segment(
    setup: FlySetup, state: FlyState, remaining: float
) -> Generator[Msg, Any, tuple[FlySetup, FlyState]]:
    """A new segment for what remains: gate again (the meters idled), store the settings."""
    meters = setup.meters
    logger.info("%s: resumed; segment %d records %.3f s more", setup.plan, state.segment + 1,
                remaining)
    configs = {m.name: replace(setup.configs[m.name], duration_s=remaining) for m in meters}
    armed = {m.name: replace(setup.armed[m.name], duration_s=remaining) for m in meters}
    setup = replace(setup, configs=configs, armed=armed)
    state = FlyState(host=state.host, segment=state.segment + 1, watch=state.watch,
                     sync_table=state.sync_table, summary_table=state.summary_table)
    state.gate = yield from stubs.ntp_gate(meters, setup.ntp_confidence_ms, setup.ntp_attempts)
    group = short_uid(label="configure")
    for meter in meters:
        yield from bps.prepare(meter, configs[meter.name], group=group)
    yield from bps.wait(group=group)
    return setup, state


def _cause(exc: BaseException) -> BaseException:
    """The meter's own error behind bluesky's ``FailedStatus`` (which names only a status)."""
    if isinstance(exc, FailedStatus):
        if exc.__cause__ is not None:
            return exc.__cause__
        status = exc.args[0] if exc.args else None
        try:
            inner = status.exception(timeout=0) if status is not None else None
        except Exception:
            inner = None
        if inner is not None:
            return inner  # type: ignore[no-any-return]
    return exc


def _arm(setup: FlySetup, state: FlyState) -> Generator[Msg, Any, None]:
    if setup.scheduled:
        state.armed = True  # from the first `sample` on, some meter may start at T
        state.schedule = yield from stubs.schedule_start(
            setup.meters, setup.armed, start_in=setup.start_in, host_offset=state.host,
            confidences_ms=_gate_confidences(state), budget=setup.budget,
        )
        logger.info("%d meters start at T=%d", len(setup.meters), state.schedule.start_time)
    elif setup.arms:
        state.armed = True
        group = short_uid(label="arm")
        for meter in setup.meters:
            yield from bps.prepare(meter, setup.armed[meter.name], group=group)
        yield from bps.wait(group=group)


def _release(setup: FlySetup, state: FlyState) -> Generator[Msg, Any, None]:
    group = short_uid(label="release")
    for meter in setup.meters:
        state.kickoffs[meter.name] = yield from bps.kickoff(meter, group=group)
    yield from bps.wait(group=group)


def _collect_all(meters: Sequence[Any]) -> Generator[Msg, Any, None]:
    """Collect every meter's samples, and its gaps and sync records where there are new ones.

    One ``collect`` message each (no stub generator around it); a companion stream with
    nothing new gets none: at 50 meters that is 100 fewer messages per flush.
    """
    for meter in meters:
        samples, gaps, timing = stream_names(meter)
        yield Msg("collect", meter, stream=False, return_payload=False, name=samples)
        if meter.gap_stream.pending:
            yield Msg("collect", meter.gap_stream, stream=False, return_payload=False, name=gaps)
        if meter.timing_stream.pending:
            yield Msg("collect", meter.timing_stream, stream=False, return_payload=False,
                      name=timing)


def _read_once(readables: Sequence[Any], name: str) -> Generator[Msg, Any, None]:
    """One event of ``readables`` in stream ``name``: ``trigger_and_read`` without the
    triggers (these records hold values already known; their trigger is a no-op), so 2 + N
    messages instead of 3 + 2 N.  The bundle is dropped if a read fails, as there."""

    def reads() -> Generator[Msg, Any, None]:
        for obj in readables:
            yield Msg("read", obj)

    def dropped(exc: BaseException) -> Generator[Msg, Any, None]:
        yield Msg("drop")
        raise exc

    def saved() -> Generator[Msg, Any, None]:
        yield Msg("save")

    yield Msg("create", name=name)
    yield from bpp.contingency_wrapper(reads(), except_plan=dropped, else_plan=saved)


def _complete_while_collecting(setup: FlySetup, state: FlyState,
                               alignment: AlignmentStream | None) -> Generator[Msg, Any, None]:
    group = short_uid(label="complete")
    for meter in setup.meters:
        state.completes[meter.name] = yield from bps.complete(meter, group=group)
    if alignment is not None:
        # Its worker starts now, once the meters sample (its imports would compete with the
        # arming's deadline), and aligns each meter's file as soon as that fly is complete.
        alignment.follow(state.completes)
    next_sync = time.monotonic() + setup.ntp_period if setup.ntp_period is not None else math.inf
    live = [meter.live_stream for meter in setup.meters]
    live_period = min(stream.period_s for stream in live)
    next_live = time.monotonic() + live_period
    done = False
    while not done:
        # A pause here stops every meter (their devices' pause()) and resumes by replaying
        # only this loop's messages, never `sample`; the plan then starts a new segment.
        yield from bps.checkpoint()
        yield from bps.wait(group=group, timeout=setup.flush_period, error_on_timeout=False)
        done = all(status.done for status in state.completes.values())
        yield from _collect_all(setup.meters)
        if not done and time.monotonic() >= next_live:
            # The live view into 'primary' (BestEffortCallback tables and plots it), read
            # without triggers: a trigger's wait would replace the waiting_hook's progress
            # bars of the pending complete group ("Previous ProgressBar never completed").
            yield from _read_once(live, "primary")
            next_live += live_period * max(1, math.ceil((time.monotonic() - next_live) / live_period))
        if not done and time.monotonic() >= next_sync:
            assert setup.ntp_period is not None
            yield from _periodic_ntp(setup, state)
            # from this trigger, not from when it was due: the loop looks once a flush period,
            # and a late trigger must not leave the next one less than a period later
            next_sync = time.monotonic() + setup.ntp_period


def _periodic_ntp(setup: FlySetup, state: FlyState) -> Generator[Msg, Any, None]:
    """Trigger every meter's NTP whose previous periodic sync is done (§6.5), as one status
    (:mod:`plans._periodic`: the RunEngine keeps every status no plan waits for)."""
    if state.periodic is None:
        state.periodic = PeriodicSync(setup.meters)
    yield from bps.trigger(state.periodic, group=state.periodic_group)


def _final(setup: FlySetup, state: FlyState,
           alignment: AlignmentStream | None) -> Generator[Msg, Any, None]:
    """The end-of-run records.  The alignment (how well the meters really line up, measured
    on their L1 voltages; the meters' files are complete here) is computed by its worker
    process while the RunEngine writes the others, and collected last."""
    if alignment is not None:
        alignment.start()
    try:
        yield from _collect_all(setup.meters)
        yield from _write_tables(setup, state)
        if alignment is not None:
            yield from bps.declare_stream(alignment, name=alignment.name, collect=True)
            yield Msg("collect", alignment, stream=False, return_payload=False,
                      name=alignment.name)
    finally:
        if alignment is not None:
            alignment.close()


def _wind_down(setup: FlySetup, state: FlyState,
               alignment: AlignmentStream | None) -> Generator[Msg, Any, None]:
    """After a failure: stop what runs, wait for the tails, collect and summarise all."""
    meters = setup.meters
    group = short_uid(label="wind_down")
    for meter in meters:
        kick = state.kickoffs.get(meter.name)
        if meter.name not in state.completes and kick is not None and kick.done and kick.success:
            state.completes[meter.name] = yield from bps.complete(meter, group=group)
    for meter in meters:
        status = state.completes.get(meter.name)
        if (status is not None and not status.done) or (status is None and state.armed):
            yield from bps.stop(meter)
    deadline = time.monotonic() + WIND_DOWN_S
    while (any(not s.done for s in state.completes.values())
           and time.monotonic() < deadline):
        yield from bps.sleep(0.1)
    yield from _final(setup, state, alignment)


SYNC_COLUMNS = {
    "meter": TableColumn("string"),
    "segment": TableColumn("integer"),
    "host_offset_s": TableColumn("number", "s"),
    "host_delay_s": TableColumn("number", "s"),
    "start_margin_s": TableColumn("number", "s"),
    "gate_confidence_ms": TableColumn("number", "ms"),
    "gate_attempts": TableColumn("integer"),
    "scheduled_start": TableColumn("number", "s"),
    "reply_start_ts": TableColumn("number", "s"),
    "sample_ntp_confidence_ms": TableColumn("number", "ms"),
    "periodic_syncs": TableColumn("integer"),
    "periodic_sync_failures": TableColumn("integer"),
}
"""The ``synchronization`` table, one row per meter and segment: the run-wide
``host_offset_s``, ``host_delay_s`` (the host clock against the time server) and
``start_margin_s`` repeated in every row of the segment; per meter the NTP gate's last
confidence and attempts, ``scheduled_start`` (``T``, the meters' clock), the sample reply's
``reply_start_ts``, ``sample_ntp_confidence_ms`` (the sync inside a scheduled ``sample``,
§6.4) and its periodic syncs during the segment (and how many failed).  NaN means "not known"
(not measured, immediate start, no such sync), never zero."""


def sync_table() -> TableStream:
    """An empty ``synchronization`` table (see :data:`SYNC_COLUMNS`)."""
    return TableStream("synchronization", SYNC_COLUMNS, source="plans.synchronized_fly")


def _write_tables(setup: FlySetup, state: FlyState) -> Generator[Msg, Any, None]:
    """This segment's rows of the ``synchronization`` and ``meter_summary`` tables, each
    declared the first time (a stream is declared once per run) and collected as one page."""
    tables: list[TableStream] = []
    if setup.synchronization:
        state.sync_table.add(_sync_rows(setup, state))
        tables.append(state.sync_table)
    state.summary_table.record(setup.meters, state.segment)
    tables.append(state.summary_table)
    for table in tables:
        if not table.declared:
            yield from bps.declare_stream(table, name=table.name, collect=True)
            table.declared = True
        yield Msg("collect", table, stream=False, return_payload=False, name=table.name)


def _sync_rows(setup: FlySetup, state: FlyState) -> list[dict[str, Any]]:
    """What each meter's start stands on, as known after the segment (:data:`SYNC_COLUMNS`)."""
    common = {
        "segment": state.segment,
        "host_offset_s": state.host.offset_s if state.host is not None else math.nan,
        "host_delay_s": state.host.delay_s if state.host is not None else math.nan,
        "start_margin_s": state.schedule.margin_s if state.schedule is not None else math.nan,
        "scheduled_start": (float(state.schedule.start_time) if state.schedule is not None
                            else math.nan),
    }
    rows = []
    for meter in setup.meters:
        gate = state.gate.get(meter.name)
        reply = getattr(meter, "last_sample_reply", None)
        rows.append({
            "meter": meter.name, **common,
            "gate_confidence_ms": _nan(gate.confidence_ms if gate else None),
            "gate_attempts": int(gate.attempts) if gate else 0,
            "reply_start_ts": _nan(reply.start_ts if reply is not None else None),
            "sample_ntp_confidence_ms": _start_sync_confidence(meter, state),
            "periodic_syncs": state.periodic.sent[meter.name] if state.periodic else 0,
            "periodic_sync_failures": state.periodic.failed[meter.name] if state.periodic else 0,
        })
    return rows


def _start_sync_confidence(meter: Any, state: FlyState) -> float:
    """The confidence of the sync the meter ran inside a scheduled ``sample`` (§6.4)."""
    if state.schedule is None:
        return math.nan
    for record in getattr(meter.timing_stream, "records", []):
        if not record.during_sampling:
            return _nan(record.confidence_ms)
    return math.nan


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
