"""Plan stubs for synchronized SmartMeter recordings; compose them into your own plans.

* :func:`ntp_gate` - sync every meter (``meter.ntp``) until each one's confidence is at most
  the limit, retrying only the meters still above it; raise a table otherwise.
* :func:`measure_host_offset` - the host clock against a time server (``HostClock``).
* :func:`schedule_start` - choose one start instant ``T`` for all meters (§6.4), arm them
  concurrently and check that every one accepted ``T`` in time.
* :func:`release` - kick every meter off together (releases ``release="plan"`` meters).
* :func:`snapshot_settings` / :func:`restore_settings` - the meters' writable settings.

Like the plans, each stub checks its arguments before its first message.  None of them opens
a run: ``schedule_start`` and ``release`` need one open only because bluesky requires it
for ``kickoff``; the gate and the host offset are meant to run before ``open_run`` so their
results can go into the start document.

Failures are data here: a meter whose sync fails is retried and reported in the table, not
raised at the first failure (see :mod:`plans._settle`).
"""

import logging
import math
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import Msg, short_uid

from smartmeter_ophyd.devices import FlyConfig, SmartMeter

from . import _validate as check
from ._errors import NtpGateError, PlanArgumentError, StartScheduleError
from ._settle import SettledStatus, Settling
from ._start import StartBudget, StartChoice, choose_start, replies_in_time

logger = logging.getLogger(__name__)

NTP_WAIT_S = 10.0
"""Longest wait for one round of syncs; each ``meter.ntp`` also fails on its own timeout."""
ARM_WAIT_S = 5.0
"""Longest wait for the meters' replies to a scheduled ``sample`` (about 0.4 s each, §6.4)."""
SETTINGS = ("time_server", "log_level", "mqtt_server", "stream_server", "calibration",
            "daily_restart", "sampling_rate", "measures", "transport", "sample_prefix",
            "flow_control")
"""What :func:`snapshot_settings` records: every writable setting except the meter's name."""


# ------------------------------------------------------------------------------ NTP gate


@dataclass(frozen=True, slots=True)
class GateResult:
    """One meter's syncs in the gate: a confidence (ms) per attempt, None where it failed."""

    meter: str
    limit_ms: float
    confidences_ms: tuple[float | None, ...] = ()
    errors: tuple[str | None, ...] = ()

    @property
    def attempts(self) -> int:
        return len(self.confidences_ms)

    @property
    def confidence_ms(self) -> float | None:
        """The last attempt's confidence (None: it failed, or no attempt was made)."""
        return self.confidences_ms[-1] if self.confidences_ms else None

    @property
    def passed(self) -> bool:
        conf = self.confidence_ms
        return conf is not None and conf <= self.limit_ms

    def with_attempt(self, confidence_ms: float | None, error: str | None) -> "GateResult":
        return replace(self, confidences_ms=(*self.confidences_ms, confidence_ms),
                       errors=(*self.errors, error))

    def as_dict(self) -> dict[str, Any]:
        return {
            "confidences_ms": list(self.confidences_ms),
            "errors": list(self.errors),
            "attempts": self.attempts,
            "passed": self.passed,
            "limit_ms": self.limit_ms,
        }


def gate_table(results: Mapping[str, GateResult], labels: Mapping[str, str]) -> str:
    """The gate's outcome as a text table: one row per meter, one column per attempt."""
    attempts = max((r.attempts for r in results.values()), default=0)
    width = max([len("meter"), *(len(labels.get(n, n)) for n in results)])
    columns = [f"{f'attempt {i + 1}':>10}" for i in range(attempts)]
    head = "  ".join([f"{'meter':<{width}}", *columns, "result"])
    rows = [head]
    notes = []
    for name, result in results.items():
        cells = []
        for i in range(attempts):
            if i >= result.attempts:
                cells.append(f"{'-':>10}")
            elif result.confidences_ms[i] is None:
                cells.append(f"{'failed':>10}")
                error = str(result.errors[i])
                who = "" if labels.get(name, name) in error else f"{labels.get(name, name)}: "
                notes.append(f"  attempt {i + 1}: {who}{error}")
            else:
                cells.append(f"{result.confidences_ms[i]:>7g} ms")
        if result.passed:
            verdict = "ok"
        elif result.confidence_ms is None:
            verdict = "sync failed"
        else:
            verdict = f"above {result.limit_ms:g} ms"
        rows.append("  ".join([f"{labels.get(name, name):<{width}}", *cells, verdict]))
    return "\n".join(rows + notes)


CLOCK_SANITY_S = 3600.0
"""A meter whose clock is further than this from the host's after a sync fails the gate: its
time server answered nonsense the firmware accepts (§6.2: anything in 2018..2100).  Smaller
differences are left to the host-clock check (``measure_host_offset``), since then the host's
clock may be the wrong one."""


def ntp_gate(
    meters: Sequence[SmartMeter],
    confidence_ms: float = 5.0,
    attempts: int = 3,
) -> Generator[Msg, Any, dict[str, GateResult]]:
    """Sync every meter until each confidence (half the SNTP round trip, §6.2) is at most
    ``confidence_ms``; retry the others, up to ``attempts`` syncs per meter.

    Returns ``{meter name: GateResult}``.  Raises :class:`~plans.NtpGateError` with a table of
    every meter's confidences when some meter is still above the limit (or its syncs failed)
    after ``attempts``.  Sends only ``ntp`` commands; the firmware ignores ``ntpConf``
    (§6.3), so gating is the host's job.
    """
    plan = "ntp_gate"
    meters = check.meter_list(meters, plan, parts=("ntp", "name"))
    limit = check.number(confidence_ms, "confidence_ms", plan, minimum=0.0, exclusive_minimum=True)
    attempts = check.integer(attempts, "attempts", plan, minimum=1, maximum=100)
    results = {m.name: GateResult(m.name, limit) for m in meters}
    pending = list(meters)
    for attempt in range(1, attempts + 1):
        group = short_uid(label="ntp_gate")
        statuses: dict[str, SettledStatus] = {}
        for meter in pending:
            statuses[meter.name] = yield from bps.trigger(Settling(meter.ntp), group=group)
        yield from bps.wait(group=group, timeout=NTP_WAIT_S, error_on_timeout=False)
        for meter in pending:
            status = statuses[meter.name]
            if status.succeeded:
                conf = yield from bps.rd(meter.ntp.confidence_ms)
                synced_at = yield from bps.rd(meter.ntp.synced_at)
                off = float(synced_at) - time.time()
                if math.isfinite(off) and abs(off) > CLOCK_SANITY_S:
                    # §6.2: the firmware takes any server time in 2018..2100; a confident sync
                    # to nonsense is still nonsense, and no common start can be set on it
                    why = (f"after the sync its clock reads {float(synced_at):.3f}, {off:+.0f} s "
                           "from the host's: its time server answers a wrong time (check the "
                           "meter's time_server)")
                    results[meter.name] = results[meter.name].with_attempt(None, why)
                else:
                    results[meter.name] = results[meter.name].with_attempt(float(conf), None)
            else:
                error = status.error()
                why = str(error) if error is not None else f"no result within {NTP_WAIT_S:g} s"
                results[meter.name] = results[meter.name].with_attempt(None, why)
        pending = [m for m in pending if not results[m.name].passed]
        logger.info("NTP gate attempt %d: %d of %d meters above %g ms", attempt, len(pending),
                    len(meters), limit)
        if not pending:
            return results
    labels = {m.name: check.label(m) for m in meters}
    raise NtpGateError(
        f"NTP gate failed (§6.2): {len(pending)} of {len(meters)} meters did not reach a "
        f"confidence of at most {limit:g} ms in {attempts} attempts; no sample was sent\n"
        + gate_table(results, labels),
        results,
    )


# ---------------------------------------------------------------------------- host clock


@dataclass(frozen=True, slots=True)
class HostOffset:
    """The host clock against a time server: ``offset_s`` = server minus host."""

    offset_s: float
    delay_s: float
    source: str

    @property
    def uncertainty_s(self) -> float:
        """Half the round trip bounds the SNTP offset error (§6.2's rule, here for the host)."""
        return self.delay_s / 2

    def as_dict(self) -> dict[str, Any]:
        return {"offset_s": self.offset_s, "delay_s": self.delay_s, "source": self.source}


def measure_host_offset(host_clock: Any) -> Generator[Msg, Any, HostOffset]:
    """Trigger ``host_clock`` (a :class:`~smartmeter_ophyd.devices.HostClock`) and read it."""
    for part in ("trigger", "offset_s", "delay_s", "name"):
        if not hasattr(host_clock, part):
            raise PlanArgumentError(
                f"measure_host_offset: host_clock={host_clock!r} is not a HostClock (no {part})"
            )
    yield from bps.trigger(host_clock, wait=True)
    offset = yield from bps.rd(host_clock.offset_s)
    delay = yield from bps.rd(host_clock.delay_s)
    source = str(getattr(host_clock, "address", host_clock.name))
    return HostOffset(float(offset), float(delay), source)


# ------------------------------------------------------------------------ scheduled start


@dataclass(frozen=True, slots=True)
class Schedule:
    """What :func:`schedule_start` did: the choice of ``T`` and each meter's reply."""

    choice: StartChoice
    replies: dict[str, str] = field(default_factory=dict)
    """Meter name -> the reply's ``startTs`` text (``"T.000"`` when accepted, §6.4)."""
    margin_s: float = math.nan
    """Server seconds between the last reply's arrival and ``T`` (positive: in time)."""

    @property
    def start_time(self) -> int:
        return self.choice.start_time

    def as_dict(self) -> dict[str, Any]:
        return {**self.choice.as_dict(), "replies": dict(self.replies),
                "margin_s": round(self.margin_s, 6)}


def schedule_start(
    meters: Sequence[SmartMeter],
    configs: Mapping[str, FlyConfig],
    *,
    start_in: float | None = None,
    host_offset: HostOffset | None = None,
    confidences_ms: Mapping[str, float] | None = None,
    budget: StartBudget = StartBudget(),  # noqa: B008 - frozen, immutable
) -> Generator[Msg, Any, Schedule]:
    """Arm every meter for one start instant ``T`` and check they all accepted it in time.

    ``configs`` maps meter name to its :class:`FlyConfig` (without ``start_time``).  ``T`` is
    chosen by :func:`~plans._start.choose_start` from the meters' NTP confidences (default:
    each meter's last ``meter.ntp.confidence_ms``) and ``host_offset`` (None: the host clock
    is taken as the server's).  All ``sample`` commands go out together (one ``prepare``
    group); a scheduled start cannot be cancelled (§6.4), so nothing is ever re-sent.

    Raises :class:`~plans.StartScheduleError` naming every meter that refused ``T`` (with the
    meter's own message), replied with another ``startTs``, or replied after ``T``.  Meters
    that did accept will start at ``T`` regardless: unstage them (the plans do) to stop them.
    """
    plan = "schedule_start"
    meters = check.meter_list(meters, plan, parts=("prepare", "ntp", "name"))
    missing = [m.name for m in meters if m.name not in configs]
    if missing:
        raise PlanArgumentError(f"{plan}: no FlyConfig for {missing}")
    if start_in is not None:
        check.number(start_in, "start_in", plan, minimum=0.5, maximum=20.0, exclusive_minimum=True)
    if confidences_ms is None:
        confidences: dict[str, float] = {}
        for meter in meters:
            conf = yield from bps.rd(meter.ntp.confidence_ms)
            if conf is None or not math.isfinite(conf):
                raise StartScheduleError(
                    f"{plan}: {check.label(meter)} has no NTP confidence; run ntp_gate first",
                    [meter.name],
                )
            confidences[meter.name] = float(conf)
    else:
        confidences = {m.name: float(confidences_ms[m.name]) for m in meters}
    offset = host_offset.offset_s if host_offset is not None else 0.0
    uncertainty = host_offset.uncertainty_s if host_offset is not None else 0.0
    chosen_at = time.time()
    choice = choose_start(chosen_at, confidences, host_offset_s=offset,
                          host_offset_uncertainty_s=uncertainty, start_in=start_in, budget=budget)
    start = choice.start_time
    logger.info("scheduling %d meters at T=%d (%.3f s ahead)", len(meters), start, choice.lead_s)
    group = short_uid(label="arm")
    statuses: dict[str, SettledStatus] = {}
    for meter in meters:
        armed = replace(configs[meter.name], start_time=start)
        statuses[meter.name] = yield from bps.prepare(Settling(meter), armed, group=group)
    dispatched_s = time.time() - chosen_at
    allowed_s = budget.for_meters(len(meters)).dispatch_s
    if dispatched_s > allowed_s:
        logger.warning("%s: the %d sample commands went out %.3f s after T was chosen, more "
                       "than the %.3f s allowed (StartBudget.dispatch_s and "
                       "dispatch_per_meter_s): a meter may refuse T",
                       plan, len(meters), dispatched_s, allowed_s)
    else:
        logger.debug("%s: %d sample commands out in %.3f s", plan, len(meters), dispatched_s)
    yield from bps.wait(group=group, timeout=ARM_WAIT_S, error_on_timeout=False)
    margin = replies_in_time(start, time.time(), offset)
    replies: dict[str, str] = {}
    problems: list[str] = []
    for meter in meters:
        status = statuses[meter.name]
        if not status.inner.done:
            problems.append(f"{check.label(meter)}: no reply within {ARM_WAIT_S:g} s")
            continue
        if not status.succeeded:
            problems.append(f"{check.label(meter)}: {status.error()}")
            continue
        reply = getattr(meter, "last_sample_reply", None)
        text = str(reply.raw_fields.get("startTs")) if reply is not None else "no reply"
        replies[meter.name] = text
        if text != f"{start}.000":
            problems.append(f"{check.label(meter)}: replied startTs={text!r}, not '{start}.000'")
    if not problems and margin <= 0:
        problems.append(f"the replies arrived {-margin:.3f} s after T={start}")
    if problems:
        accepted = sorted(n for n, text in replies.items() if text == f"{start}.000")
        raise StartScheduleError(
            f"{plan}: scheduled start T={start} failed (§6.4):\n  " + "\n  ".join(problems)
            + (f"\nmeters that accepted T and will start then (unstage stops them): {accepted}"
               if accepted else ""),
            [m.name for m in meters],
        )
    return Schedule(choice=choice, replies=replies, margin_s=margin)


# ------------------------------------------------------------------------------ release


def release(
    meters: Sequence[SmartMeter], *, timeout: float | None = None
) -> Generator[Msg, Any, None]:
    """Kick every meter off in one group and wait until each really sampled.

    A meter prepared with ``release="plan"`` (``flow_control="cts"``) sits paused with its
    samples buffered; its kickoff sends ``cts true`` (§5.1), so all of them start sending
    together.  A scheduled meter's kickoff completes at its first sample, after ``T``.
    Needs an open run (bluesky's rule for ``kickoff``).
    """
    meters = check.meter_list(meters, "release", parts=("kickoff", "name"))
    if timeout is not None:
        check.number(timeout, "timeout", "release", minimum=0.0, exclusive_minimum=True)
    group = short_uid(label="release")
    for meter in meters:
        yield from bps.kickoff(meter, group=group)
    yield from bps.wait(group=group, timeout=timeout)


# ----------------------------------------------------------------------------- settings


def snapshot_settings(
    meters: Sequence[SmartMeter],
) -> Generator[Msg, Any, dict[str, dict[str, Any]]]:
    """``{meter name: {setting: value}}`` of every setting in :data:`SETTINGS`."""
    meters = check.meter_list(meters, "snapshot_settings", parts=("name", *SETTINGS))
    snapshot: dict[str, dict[str, Any]] = {}
    for meter in meters:
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            values[setting] = yield from bps.rd(getattr(meter, setting))
        snapshot[meter.name] = values
    return snapshot


def restore_settings(
    meters: Sequence[SmartMeter],
    snapshot: Mapping[str, Mapping[str, Any]],
) -> Generator[Msg, Any, dict[str, list[str]]]:
    """Set back every setting that differs from ``snapshot`` (from :func:`snapshot_settings`).

    Writes go out together (one group) and fail with the meter's own message.  Returns
    ``{meter name: [settings written]}``.
    """
    plan = "restore_settings"
    meters = check.meter_list(meters, plan, parts=("name", *SETTINGS))
    for meter in meters:
        if meter.name not in snapshot:
            raise PlanArgumentError(f"{plan}: the snapshot has no settings of {check.label(meter)}")
        unknown = sorted(set(snapshot[meter.name]) - set(SETTINGS))
        if unknown:
            raise PlanArgumentError(
                f"{plan}: {check.label(meter)}: unknown settings {unknown}; "
                f"allowed: {list(SETTINGS)}"
            )
    group = short_uid(label="restore")
    written: dict[str, list[str]] = {}
    for meter in meters:
        written[meter.name] = []
        for setting, value in snapshot[meter.name].items():
            current = yield from bps.rd(getattr(meter, setting))
            if _same(current, value):
                continue
            yield from bps.abs_set(getattr(meter, setting), value, group=group)
            written[meter.name].append(setting)
    yield from bps.wait(group=group)
    return written


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Sequence) and not isinstance(a, str):
        return isinstance(b, Sequence) and not isinstance(b, str) and list(a) == list(b)
    return bool(a == b)
