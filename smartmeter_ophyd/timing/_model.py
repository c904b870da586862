"""The time model: each stored sample's absolute time, from the meter's own records.

Intent
------
Never host receive times: a sample's time follows from what the meter logged about its
session (``start_ts``, the §6.5 sync records, the stop reply) and from how firmware 2.2
stores samples.  The firmware's structure (§4.3, §4.10, §6.5):

* **RTC seconds.** With an RTC, a 1 Hz interrupt restarts the per-second counter: at most
  ``rate`` samples are accepted per RTC second, the surplus is refused, and a second short
  by 1..4 samples is padded with copies of the last one (fillers, not announced).  So once
  running, every RTC second holds exactly ``rate`` stored rows, and the stream index counts
  RTC seconds: the DS3231 (a few ppm) is the stream's time base, not the ADE crystal.
* **Inside a second** rows sit on the sampling lattice: waveform rates every ``k/internal``
  seconds from the first kept ADE sample after the edge (bursty rates: a burst of ``rate``
  samples, then nothing, §4.3), latched rates one reading at the edge and then every
  ``1e6 // rate`` us of the ESP timer (§4.11).
* **RTC phase** (inferred from the firmware and the DS3231 data sheet, not measured; see
  ``emulator/_sampling.py``): writing the RTC restarts its countdown and the first 1 Hz
  edge follows ``rtc_first_edge_s`` (0.5 s) later.  The firmware writes it when sampling
  starts and on every NTP success on the main core (§6.2): so the seconds of a session
  begin 0.5 s after ``start_ts``, and a sync with ``sets_rtc`` restarts them 0.5 s after its
  ``To``: the second in progress is shortened (fewer rows) or stretched (its surplus
  refused: a silent jump in time of up to 0.5 s).
* **§6.5 corrections.** After a sync logged ``Correcting: n``, each pending unit applies at
  the next sample stored with ``count % rate == 1``: +1 stores it twice (one extra row in
  that second, later rows one slot earlier), -1 stores it not at all (consecutive).

The relation between RTC seconds and meter time (``1 + rtc_ppm * 1e-6`` seconds per RTC
second, and the instant of each RTC restart) is fitted by weighted least squares: the
session start (``start_ts``), the restart instants (``To`` of syncs that set the RTC) and
every sync record's ``(To, total)`` pair - the row the firmware had reached when the clock
was freshly set - each weighted by its NTP confidence and the 1 ms stamp resolution.
``To`` is read right after a sync, so it is true time to within the confidence.

Limits
------
* The RTC phase rule above is an inference.  Uniform waveform rates do not depend on it
  (their rows are evenly spaced whatever the phase), bursty and latched rates and stretched
  seconds do.  Each record's ``SecondInterrupts`` is checked against it (``notes``).
* The ADE lattice phase at an RTC edge is unknowable from the records (the ADE crystal's
  rate is never logged when the per-second cap binds): rows are placed mid-way,
  ``placement_s`` = half a lattice step (62.5 us at 8 kHz, 2 ms at rate 10, 0 latched).
* Fillers accrue uniformly in time (their total is ``sent_samples - samples`` from the stop
  reply); a correction's row is found from the count, ignoring fillers since the sync (a few
  rows at most).  Drops straddling an RTC edge are not modelled.
* Without an RTC the counter never resets (§4.10): nominal times from the start, no fit.
* With fewer than two sync records the RTC rate is not fitted (nominal), as ``notes`` say.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ..protocol import Measures, decimation, rate_problem

__all__ = [
    "DeclaredGap",
    "ModelledTimes",
    "SessionRecords",
    "SyncRecord",
    "TimeModelError",
    "model_times",
]

logger = logging.getLogger(__name__)

RTC_FIRST_EDGE_S: Final = 0.5
"""DS3231: first 1 Hz edge after its seconds register is written (inferred, see above)."""
FILLER_LIMIT: Final = 5
"""A second is padded only when fewer than 5 samples are missing (§4.10)."""
STAMP_RESOLUTION_S: Final = 1e-3
"""``startTs``, ``start_ts``, ``To`` carry milliseconds (§6.1)."""
_MIN_SYNCS_FOR_RATE: Final = 2
RTC_PRIOR_PPM: Final = 20.0
"""Prior spread of the RTC rate error (a DS3231 is specified at +-2 ppm; 20 ppm covers a
poorer crystal): the fit shrinks toward nominal when the records hardly constrain the rate
(bursty and latched rates: a record only says between which rows it fell)."""


class TimeModelError(ValueError):
    """Records that cannot give times; the message names the meter and the problem."""


@dataclass(frozen=True)
class SyncRecord:
    """One §6.5 record: what the meter logged after an NTP success during sampling."""

    to_ts: float
    """``To <timestamp>``: meter time right after the sync (unix s, ms resolution)."""
    total: int
    """``is <total> samples``: the firmware's sample count then (duplicates counted,
    fillers not)."""
    goal: int
    """``Should be: <goal>``."""
    offset_s: float
    """``Offset of <s> s``."""
    confidence_ms: float | None
    """``NTP synced with conf: <ms>`` of that sync (None if not captured)."""
    correction: int = 0
    """``Correcting: <n> samples`` (0 when no such line followed)."""
    second_interrupts: int | None = None
    """``SecondInterrupts <n>``: RTC interrupts since the start, if captured."""
    sets_rtc: bool = True
    """The sync ran on the main core (``ntp`` without ``bg``, ``timeServer``) and so wrote
    the RTC, restarting its seconds (§6.2)."""


@dataclass(frozen=True)
class DeclaredGap:
    """Samples the host knows it did not receive (packet gap)."""

    index: int
    """Index (in the received samples) of the first sample after the gap."""
    missing: int
    """Samples missing before it; -1 if unknown."""


@dataclass(frozen=True)
class SessionRecords:
    """Everything the time model needs about one session, from the meter's own records."""

    meter: str
    rate: int
    """``samplingrate`` of the session: rows per RTC second."""
    start_ts: float
    """The stop reply's ``start_ts`` (unix s): the real start, on the meter's clock."""
    received: int
    """Samples received and stored (length of the time axis)."""
    syncs: tuple[SyncRecord, ...] = ()
    gaps: tuple[DeclaredGap, ...] = ()
    latched: bool = False
    """Latched measures (p,q, v,i_RMS) on the latched path (§4.11)."""
    decimation_rate: int | None = None
    """Waveform path: the rate whose decimation ``k`` is in use, if not ``rate`` (a scheduled
    start of latched measures streams waveforms with the previous command's k, §6.4)."""
    rtc: bool = True
    """The meter has a DS3231 (``info`` ``rtc``)."""
    start_uncertainty_s: float = 5e-3
    """How well ``start_ts`` is known: the confidence of the sync it stands on plus its drift
    since; the default suits a start right after a LAN sync."""
    samples: int | None = None
    """Stop reply ``samples`` (count without fillers)."""
    sent_samples: int | None = None
    """Stop reply ``sent_samples`` (rows, fillers included)."""
    stop_ts: float | None = None
    """Stop reply ``stop_ts``."""


@dataclass(frozen=True)
class ModelledTimes:
    """Result of ``model_times``."""

    times: np.ndarray
    """float64 (received,): unix time of each received sample."""
    notes: tuple[str, ...]
    """What the model assumed or could not check, in words."""
    rtc_ppm: float
    """Fitted RTC rate error against the meter's NTP time, positive when the RTC runs fast
    (0.0 if not fitted)."""
    rate_fitted: bool
    anchors: np.ndarray
    """float64: fitted instants of the session start and of each RTC restart."""
    residuals_s: np.ndarray
    """float64 (syncs,): ``To`` minus the model's time of the row reached at ``To``."""
    placement_s: float
    """Bound on the in-second placement error from the unknown lattice phase."""
    positions: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    """int64 (received,): stream position of each sample (index plus declared missing)."""
    ambiguous: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    """int64: indices of received samples next to a stretched second's silent jump (§6.2
    RTC restart): which side of the jump they fall on depends on one sample of the first
    second's count, which no record reveals, so their time may be off by the jump."""


# ---------------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class _Lattice:
    rate: int
    step_s: float
    head_phase_s: float
    edge_phase_s: float
    placement_s: float
    continuous: bool = False
    """Uniform waveform rate: the lattice runs on through an RTC edge (no burst, no timer
    restart), so rows on either side of an uncapped second are one step apart."""


def _lattice(rec: SessionRecords) -> _Lattice:
    if rec.latched:
        problem = rate_problem(rec.rate, Measures.PQ)
        if problem is not None:
            raise TimeModelError(f"meter {rec.meter!r}: {problem}")
        period = (1_000_000 // rec.rate) * 1e-6
        # The hardware timer first fires one period after the start; at an RTC edge one
        # reading is taken at once and the timer restarts (§4.11).
        return _Lattice(rec.rate, period, period, 0.0, 0.0)
    source = rec.rate if rec.decimation_rate is None else rec.decimation_rate
    for r, what in ((rec.rate, "rate"), (source, "decimation rate")):
        problem = rate_problem(r, Measures.VI)
        if problem is not None:
            raise TimeModelError(f"meter {rec.meter!r}: {what}: {problem}")
    dec = decimation(source)
    step = dec.keep_every / dec.internal_rate
    # First kept sample: within one ADE period of the start (sample 0); after an edge
    # anywhere on the lattice, so half a step is the best guess (§4.3).
    return _Lattice(rec.rate, step, 0.0, 0.5 * step, 0.5 * step,
                    continuous=dec.keep_every * rec.rate == dec.internal_rate)


def _positions(rec: SessionRecords, notes: list[str]) -> np.ndarray:
    """Stream position of each received sample: index plus the samples declared missing."""
    n = rec.received
    if n < 0:
        raise TimeModelError(f"meter {rec.meter!r}: received count {n} is negative")
    gaps = sorted(rec.gaps, key=lambda g: g.index)
    unknown = [g for g in gaps if g.missing < 0]
    for g in gaps:
        if not 0 <= g.index <= n:
            raise TimeModelError(
                f"meter {rec.meter!r}: gap at sample {g.index} lies outside the {n} samples")
        if g.missing < -1:
            raise TimeModelError(
                f"meter {rec.meter!r}: gap at sample {g.index} has missing={g.missing}")
    known = sum(g.missing for g in gaps if g.missing >= 0)
    missing = {g.index: g.missing for g in gaps}
    if unknown:
        if len(unknown) == 1 and rec.sent_samples is not None:
            inferred = rec.sent_samples - n - known
            if inferred < 0:
                raise TimeModelError(
                    f"meter {rec.meter!r}: gap at sample {unknown[0].index} has an unknown "
                    f"size and sent_samples {rec.sent_samples} is below the {n + known} "
                    "samples accounted for")
            missing[unknown[0].index] = inferred
            notes.append(f"gap at sample {unknown[0].index}: size {inferred} inferred from "
                         "the stop reply's sent_samples")
        else:
            raise TimeModelError(
                f"meter {rec.meter!r}: {len(unknown)} gaps of unknown size (first at sample "
                f"{unknown[0].index}): the positions of later samples are unknown")
    if not any(missing.values()):
        return np.arange(n, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    for index, count in missing.items():
        offsets[index] += count
    return np.arange(n, dtype=np.int64) + np.cumsum(offsets)[:n]


@dataclass
class _Structure:
    """Intervals between RTC edges and the rows each holds."""

    bounds: np.ndarray  # (m+1,) interval boundaries (meter time); bounds[0] = start
    segment: np.ndarray  # (m,) segment (RTC restart) whose edge opens the interval
    u: np.ndarray  # (m,) RTC seconds from that segment's anchor to the opening edge
    phase: np.ndarray  # (m,) first sample after the opening boundary
    starts: np.ndarray  # (m+1,) first stream position of each interval; starts[-1] = total
    fillers: np.ndarray  # (m,) filler rows at the end of each interval
    event_row: np.ndarray  # rows where the slot count changes (corrections)
    event_delta: np.ndarray
    restart_intervals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Intervals in progress when the RTC restarted (shortened or stretched seconds)."""
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Samples each second accepted against the per-second cap (before corrections)."""


_OFF_NOMINAL_CHI2: Final = 1.0
"""Penalty for a first-second count off the nominal one (ties stay nominal)."""
_DECISIVE_CHI2: Final = 9.0
"""The records settle the first second's count when no alternative comes this close."""
_COARSE_STEP_S: Final = 4e-3
"""Lattice steps this long are counted from the RTC edge at a restart, finer ones from the
record's count (a millisecond of stamp error is several rows of a fine lattice)."""
_EDGE_TOLERANCE_S: Final = 1e-6
"""A lattice instant this close before an RTC edge counts as on it (the next second's)."""


def _lattice_count(length: np.ndarray, phase: np.ndarray, step: float) -> np.ndarray:
    """Lattice instants ``phase + j * step`` inside ``[0, length)``."""
    room = length - phase - _EDGE_TOLERANCE_S
    return np.where(room > 0, np.floor(room / step) + 1, 0).astype(np.int64)


def _fill(accepted: np.ndarray, rate: int) -> np.ndarray:
    """Filler rows the RTC interrupt appends to a second short by 1..4 samples (§4.10)."""
    short = rate - accepted
    return np.where((short > 0) & (short < FILLER_LIMIT), short, 0).astype(np.int64)


def _build(rec: SessionRecords, lat: _Lattice, seeds: np.ndarray, total_rows: int,
           sync_rows: np.ndarray, restart_of: list[int], first_edge: float,
           head_adjust: int = 0) -> _Structure:
    """Intervals between RTC edges and their rows, from the restart stamps ``seeds``.

    The row counts are fixed here, from the stamps and a nominal RTC second, never from a
    fitted rate: a noisy fit must not move rows between seconds.  ``_place`` later moves
    the boundaries to the fitted restart instants and rate.  ``restart_of[g - 1]`` is the
    sync record that restarted the RTC at ``seeds[g]``.  The rows of the second in progress
    at a restart come from that record's count (the rows already stored) plus the lattice
    instants left until the new first edge, capped at ``rate``: no time error of the
    previous segment turns into a row count.  ``head_adjust`` moves the first second's
    count by whole rows (a lattice instant can tie with its edge).
    """
    rate = lat.rate
    bounds = [float(seeds[0])]
    segment = [0]
    u = [0.0]
    first_interval = [0]
    for g, seed in enumerate(seeds):
        first = seed + first_edge
        if g + 1 < len(seeds):
            n = max(0, math.ceil(seeds[g + 1] - first))
        else:
            # Enough seconds for every row (a correction drops at most 10 a sync).
            n = math.ceil(total_rows / max(rate - 10, 1)) + 3
        first_interval.append(len(bounds))
        whole = np.arange(n)
        bounds.extend((first + whole).tolist())
        segment.extend([g] * n)
        u.extend((first_edge + whole).tolist())
    edges = np.array(bounds)
    lengths = np.diff(np.append(edges, edges[-1] + 1.0))
    phases = np.full(edges.size, lat.edge_phase_s)
    phases[0] = lat.head_phase_s
    accepted = np.minimum(_lattice_count(lengths, phases, lat.step_s), rate)
    accepted[0] = min(max(int(accepted[0]) + head_adjust, 0), rate)
    rows = accepted + _fill(accepted, rate)
    starts = np.concatenate(([0], np.cumsum(rows)))
    # Records in order: corrections queued earlier apply before a later restart counts
    # the rows of its second.
    restart_intervals: list[int] = []
    restarted = {k: g for g, k in enumerate(restart_of, start=1)}
    fillers = rows - accepted
    corrections = _Corrections(rate, starts, rows, fillers)
    for k, sync in enumerate(rec.syncs):
        corrections.advance(int(sync_rows[k]))
        segment_of = restarted.get(k)
        i = first_interval[segment_of + 1] - 1 if segment_of is not None else -1
        if segment_of is not None and i >= 0:  # i: the second in progress at the restart
            g = segment_of
            restart_intervals.append(i)
            if lat.step_s >= _COARSE_STEP_S:
                # Coarse lattice (latched timer, slow bursts): its phase in the second is
                # known, so count from the edge; a stamp error cannot move a row.
                acc = min(int(_lattice_count(np.array([seeds[g] + first_edge - edges[i]]),
                                             phases[i:i + 1], lat.step_s)[0]), rate)
            else:
                already = min(max(int(sync_rows[k] - starts[i]), 0), rate)
                left = _lattice_count(np.array([seeds[g] + first_edge - sync.to_ts]),
                                      np.array([0.5 * lat.step_s]), lat.step_s)[0]
                acc = min(already + int(left), rate)
            new_rows = acc + int(_fill(np.array([acc]), rate)[0])
            accepted[i] = acc
            fillers[i] = new_rows - acc
            starts[i + 1:] += new_rows - rows[i]
            rows[i] = new_rows
        corrections.record(int(sync_rows[k]), sync.total, sync.correction)
    corrections.advance(int(starts[-1]))
    event_row, event_delta = corrections.events()
    return _Structure(bounds=np.append(edges, edges[-1] + lengths[-1]),
                      segment=np.array(segment), u=np.array(u), phase=phases,
                      starts=starts, fillers=fillers, event_row=event_row,
                      event_delta=event_delta,
                      restart_intervals=np.array(restart_intervals, dtype=np.int64),
                      accepted=accepted)


def _place(st: _Structure, anchors: np.ndarray, rtc_rate: float) -> _Structure:
    """The same rows with boundaries at fitted restart instants and RTC rate."""
    opening = anchors[st.segment] + st.u * (1.0 + rtc_rate)
    opening[0] = anchors[0]
    last = opening[-1] + (st.bounds[-1] - st.bounds[-2]) * (1.0 + rtc_rate)
    return _Structure(bounds=np.append(opening, last), segment=st.segment, u=st.u,
                      phase=st.phase, starts=st.starts, fillers=st.fillers,
                      event_row=st.event_row, event_delta=st.event_delta,
                      restart_intervals=st.restart_intervals, accepted=st.accepted)


class _Corrections:
    """§6.5 corrections applied along the stream, record by record.

    Each pending unit applies at the next row stored with ``count % rate == 1`` (found from
    the record's count; fillers since the record are ignored): +1 stores that sample twice,
    -1 skips it, consecutively because the count does not advance.  Row counts of the
    intervals (``starts``, ``rows``) are updated in place.  Events: a duplicate's copy row
    has slot delta -1 (it repeats the previous slot); the row after ``m`` drops has +m.
    """

    def __init__(self, rate: int, starts: np.ndarray, rows: np.ndarray,
                 fillers: np.ndarray) -> None:
        self.rate, self.starts, self.rows, self.fillers = rate, starts, rows, fillers
        self.row = self.count = self.pending = 0
        self.rows_of: list[int] = []
        self.deltas: list[int] = []
        self.intervals: list[int] = []
        self._last_drop = (-1, -1)  # (row, interval) of the last drop event

    def record(self, row: int, count: int, correction: int) -> None:
        self.row, self.count = row, count
        self.pending += correction

    def advance(self, limit: int) -> None:
        """Apply pending units at rows before ``limit``."""
        if self.rate == 1:
            return  # count % 1 is never 1: corrections stay pending forever (§6.5)
        starts = self.starts
        while self.pending != 0:
            at = self.row + (1 - self.count) % self.rate
            if at >= limit:
                return
            self.count += at - self.row
            interval = int(np.searchsorted(starts, at, side="right")) - 1
            if at >= starts[interval + 1] - self.fillers[interval]:
                # Fillers are not samples: the next sample opens the next second.
                interval += 1
                at = int(starts[interval])
            if self.pending > 0:
                self.rows_of.append(at + 1)
                self.deltas.append(-1)
                self.intervals.append(interval)
                self.row, self.count = at + 2, self.count + 2
                self.pending -= 1
                change = 1
            else:
                change = -1
                self.row = at
                self.pending += 1
            starts[interval + 1:] += change
            self.rows[interval] += change
            if change < 0:
                # Rows after the dropped sample in its second sit one slot later.
                if self._last_drop == (at, interval):
                    self.deltas[-1] += 1
                else:
                    self.rows_of.append(at)
                    self.deltas.append(1)
                    self.intervals.append(interval)
                    self._last_drop = (at, interval)

    def events(self) -> tuple[np.ndarray, np.ndarray]:
        """Slot events sorted by row, without those whose second has no row after them
        (a drop that emptied the rest of its second)."""
        rows = np.array(self.rows_of, dtype=np.int64)
        interval = np.array(self.intervals, dtype=np.int64)
        keep = rows < self.starts[interval + 1] if rows.size else np.zeros(0, dtype=bool)
        rows, deltas = rows[keep], np.array(self.deltas, dtype=np.int64)[keep]
        order = np.argsort(rows, kind="stable")
        return rows[order], deltas[order]


_CHUNK: Final = 1 << 13
"""Positions placed per pass in ``_sample_times``: its temporaries (64 KB) stay in the CPU's
cache and below glibc's mmap threshold (a meter-hour is 28.8 M positions)."""


def _row_times(st: _Structure, lat: _Lattice, positions: np.ndarray) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """(times, interval, offset from the interval's opening) of stream positions."""
    interval = np.searchsorted(st.starts, positions, side="right") - 1
    np.clip(interval, 0, st.fillers.size - 1, out=interval)
    first = st.starts[interval]
    j = positions - first
    if st.event_row.size:
        cum = np.concatenate(([0], np.cumsum(st.event_delta)))
        j += (cum[np.searchsorted(st.event_row, positions, side="right")]
              - cum[np.searchsorted(st.event_row, first, side="left")])
    offset = st.phase[interval] + j * lat.step_s
    filler_from = st.starts[interval + 1] - st.fillers[interval]
    filler = (positions >= filler_from) & (st.fillers[interval] > 0)
    if filler.any():
        offset[filler] = (st.bounds[interval + 1] - st.bounds[interval])[filler]
    return st.bounds[interval] + offset, interval, offset


def _sample_times(st: _Structure, lat: _Lattice, positions: np.ndarray) -> np.ndarray:
    """``_row_times(st, lat, positions)[0]`` for ascending ``positions`` (every received
    sample), bit for bit, in chunks (a meter-hour is 28.8 M).

    Ascending positions fill each interval in one run, so the per-interval values are
    repeated over runs instead of gathered per sample: at 8 kHz about 5x faster, and this
    runs once per meter while a run closes.
    """
    times = np.empty(positions.shape[0], dtype=np.float64)
    last = st.fillers.size - 1
    # First sample of each interval after the first; intervals below starts[0] or beyond
    # the last are clipped into the end ones, as in _row_times.
    edges = np.searchsorted(positions, st.starts[1:last + 1], side="left")
    cum = np.concatenate(([0], np.cumsum(st.event_delta)))
    opening_events = cum[np.searchsorted(st.event_row, st.starts[:last + 1], side="left")]
    width = st.bounds[1:] - st.bounds[:-1]
    for lo in range(0, positions.shape[0], _CHUNK):
        part = positions[lo:lo + _CHUNK]
        bounds = np.concatenate(([lo], np.clip(edges, lo, lo + part.shape[0]),
                                 [lo + part.shape[0]]))
        runs = np.diff(bounds)
        j = part - np.repeat(st.starts[:last + 1], runs)
        if st.event_row.size:
            j += (cum[np.searchsorted(st.event_row, part, side="right")]
                  - np.repeat(opening_events, runs))
        offset = np.repeat(st.phase[:last + 1], runs) + j * lat.step_s
        for k in np.flatnonzero(st.fillers[:last + 1] > 0):
            if runs[k]:
                a, b = bounds[k] - lo, bounds[k + 1] - lo
                filler_from = st.starts[k + 1] - st.fillers[k]
                offset[a:b][part[a:b] >= filler_from] = width[k]
        times[lo:lo + part.shape[0]] = np.repeat(st.bounds[:last + 1], runs) + offset
    return times


# ---------------------------------------------------------------------------------- fit


def _sigma(confidence_ms: float | None) -> float:
    conf = 0.0 if confidence_ms is None else confidence_ms * 1e-3
    return math.hypot(conf, STAMP_RESOLUTION_S)


def _check(rec: SessionRecords) -> None:
    name = rec.meter
    if not math.isfinite(rec.start_ts) or rec.start_ts <= 0:
        raise TimeModelError(
            f"meter {name!r}: start_ts {rec.start_ts!r} is not a unix time (a meter without "
            "an NTP sync reports 0.000, §6.1): its samples have no absolute time")
    if not rec.start_uncertainty_s > 0:
        raise TimeModelError(f"meter {name!r}: start_uncertainty_s must be positive")
    previous_to, previous_total = rec.start_ts, 0
    for k, s in enumerate(rec.syncs):
        if not math.isfinite(s.to_ts) or s.to_ts <= previous_to:
            raise TimeModelError(
                f"meter {name!r}: sync record {k} has To {s.to_ts!r}, not after "
                f"{previous_to!r} (start or the previous record)")
        if s.total < previous_total:
            raise TimeModelError(
                f"meter {name!r}: sync record {k} counts {s.total} samples, fewer than "
                f"{previous_total} before it")
        if s.confidence_ms is not None and not s.confidence_ms >= 0:
            raise TimeModelError(
                f"meter {name!r}: sync record {k} has confidence {s.confidence_ms!r} ms")
        previous_to, previous_total = s.to_ts, s.total


def model_times(records: SessionRecords, *,
                rtc_first_edge_s: float = RTC_FIRST_EDGE_S) -> ModelledTimes:
    """The absolute time of every received sample of one session (see the module docstring).

    Raises ``TimeModelError`` (naming the meter) for records that cannot give times.
    """
    rec = records
    _check(rec)
    notes: list[str] = []
    lat = _lattice(rec)
    positions = _positions(rec, notes)
    total_rows = int(positions[-1]) + 1 if positions.size else 0
    if rec.sent_samples is not None and total_rows and rec.sent_samples != total_rows:
        notes.append(f"stream positions end at {total_rows}, the stop reply sent "
                     f"{rec.sent_samples}: samples lost without a declared gap, or trailing")
    syncs = rec.syncs

    if not rec.rtc:
        notes.append("no RTC: the per-second counter never resets (§4.10); nominal times "
                     "from start_ts, no rate fit")
        times = rec.start_ts + lat.head_phase_s + positions * lat.step_s
        return ModelledTimes(times=times, notes=tuple(notes), rtc_ppm=0.0, rate_fitted=False,
                             anchors=np.array([rec.start_ts]),
                             residuals_s=np.full(len(syncs), np.nan),
                             placement_s=lat.placement_s, positions=positions)

    fillers_total = None
    if rec.samples is not None and rec.sent_samples is not None:
        fillers_total = max(0, rec.sent_samples - rec.samples)
    elif syncs:
        notes.append("no stop reply counts: RTC fillers beyond the modelled ones taken as none")
    end = rec.stop_ts if rec.stop_ts is not None else (syncs[-1].to_ts if syncs else None)
    to = np.array([s.to_ts for s in syncs])
    totals = np.array([s.total for s in syncs], dtype=np.int64)
    restart_of = [k for k, s in enumerate(syncs) if s.sets_rtc]
    anchor_seed = np.array([rec.start_ts] + [syncs[k].to_ts for k in restart_of])
    anchor_sigma = np.array([rec.start_uncertainty_s]
                            + [_sigma(syncs[k].confidence_ms) for k in restart_of])
    sigma = np.array([_sigma(s.confidence_ms) for s in syncs])
    fit_rate = len(syncs) >= _MIN_SYNCS_FOR_RATE
    rows_needed = max(total_rows, int(totals.max(initial=0)) + 10)

    structures: dict[tuple[int, bytes], _Structure] = {}

    def build(sync_rows: np.ndarray, head_adjust: int) -> _Structure:
        """``_build`` once per distinct input: the passes below often repeat one."""
        key = (head_adjust, sync_rows.tobytes())
        if key not in structures:
            structures[key] = _build(rec, lat, anchor_seed, rows_needed, sync_rows,
                                     restart_of, rtc_first_edge_s, head_adjust)
        return structures[key]

    def rows_reached(head_adjust: int) -> np.ndarray:
        """A record counts samples, not rows: the row it reached adds the fillers stored
        before it.  Those of short seconds the model knows (first second, restarts); the
        rest (a slow ADE against the RTC, §4.10) accrue evenly, their total from the stop
        reply."""
        sync_rows = totals.copy()
        for _ in range(2):
            draft = build(sync_rows, head_adjust)
            closed = np.searchsorted(draft.bounds[1:], to, side="right")  # intervals ended
            modelled = np.concatenate(([0], np.cumsum(draft.fillers)))[closed]
            spare = 0
            if fillers_total is not None:
                ended = draft.bounds[1:] <= (end if end is not None else math.inf)
                spare = max(0, fillers_total - int(np.sum(draft.fillers[ended])))
            accrued = np.zeros(len(syncs))
            if spare and end is not None and end > rec.start_ts:
                accrued = np.rint(spare * np.clip((to - rec.start_ts) / (end - rec.start_ts),
                                                  0, 1))
            sync_rows = totals + modelled + accrued.astype(np.int64)
        return sync_rows

    def solve(head_adjust: int) -> tuple[float, np.ndarray, float, _Structure, np.ndarray]:
        sync_rows = rows_reached(head_adjust)
        st = build(sync_rows, head_adjust)
        anchors, rtc_rate = anchor_seed, 0.0
        if len(syncs):
            anchors, rtc_rate = _fit(st, lat, to, sync_rows, sigma, anchor_seed,
                                     anchor_sigma, fit_rate, st.restart_intervals)
        placed = _place(st, anchors, rtc_rate)
        return (_misfit(placed, lat, to, sync_rows, sigma, anchors, anchor_seed, anchor_sigma,
                        rtc_rate), anchors, rtc_rate, placed, sync_rows)

    # The first second's count can tie at its edge (a lattice instant on the RTC edge):
    # one row more or less moves every later row; the records decide when they can.
    # Without records every trial scores the priors alone (zero), so the nominal count
    # stands and the others need not be built.
    trials = {adjust: solve(adjust) for adjust in ((0, -1, 1) if len(syncs) else (0,))}
    logger.debug("%s: first-second row trials, chi-square %s", rec.meter,
                 {a: round(t[0], 2) for a, t in trials.items()})
    best = min(trials, key=lambda a: trials[a][0] + _OFF_NOMINAL_CHI2 * abs(a))
    others = sorted(trials[a][0] for a in trials if a != best)
    head_resolved = len(syncs) > 0 and others[0] - trials[best][0] > _DECISIVE_CHI2
    misfit, anchors, rtc_rate, st, sync_rows = trials[best]
    if best != 0:
        notes.append(f"first second holds {best:+d} row against the nominal count: the "
                     f"sync records fit that better (chi-square {others[0] - misfit:.1f} "
                     "lower)")
    if not fit_rate:
        notes.append(f"{len(syncs)} sync record(s): RTC rate not fitted, nominal "
                     "(1 s per RTC second); drift since the last restart is not corrected")
    times = _sample_times(st, lat, positions)
    reached, width = _reached(st, lat, sync_rows, float(anchors[0]))[:2]
    residuals = to - reached
    sigma = np.sqrt(sigma**2 + width**2 / 12.0)
    _check_interrupts(rec, st, notes)
    _check_offsets(rec, notes)
    worst = float(np.max(np.abs(residuals) - 3 * sigma)) if len(syncs) else -1.0
    if worst > 0:
        notes.append(f"a sync record disagrees with the model by {worst * 1e3:.1f} ms beyond "
                     "3 sigma: the RTC phase or a gap declaration is off")
    logger.debug("%s: time model with %d syncs, %d restarts, rtc %.2f ppm", rec.meter,
                 len(syncs), len(anchors) - 1, rtc_rate * 1e6)
    ambiguous = _ambiguous(st, lat, positions, head_resolved)
    if ambiguous.size:
        notes.append(f"{ambiguous.size} samples next to silent jumps (a burst's end, a "
                     "second cut or stretched by an RTC restart) may sit on the wrong side of "
                     "the jump: see ModelledTimes.ambiguous")
    return ModelledTimes(times=times, notes=tuple(notes), rtc_ppm=-rtc_rate * 1e6,
                         rate_fitted=fit_rate, anchors=anchors, residuals_s=residuals,
                         placement_s=lat.placement_s, positions=positions,
                         ambiguous=ambiguous)


def _ambiguous(st: _Structure, lat: _Lattice, positions: np.ndarray,
               head_resolved: bool) -> np.ndarray:
    """Received samples whose side of a silent jump the records cannot settle.

    * Next to every jump (a refused tail: a burst's end or a stretched second) when a
      partial second's count, which fixes the row at every later jump, is uncertain by a
      row (the lattice phase at its edge is unknown) and the records did not settle it.
    * Next to the end of every second cut by an RTC restart when time jumps there, on a
      fine lattice: its row count rests on a stamp and a lattice count, each +-1.
    * Next to an RTC edge that a restart came within a few milliseconds of: whether that
      edge happened before the restart is a race the stamps cannot decide.
    """
    accepted = st.accepted  # against the cap: dropped samples count, duplicates do not
    opening = st.bounds[:-1]
    last_row = opening + st.phase + (accepted - 1) * lat.step_s
    first_next = np.append(opening[1:] + st.phase[1:], np.inf)
    jump = (first_next - last_row) > 2 * lat.step_s + STAMP_RESOLUTION_S
    jump[-1] = False  # the open-ended last interval never jumps
    boundaries: list[np.ndarray] = []
    partial = np.concatenate(([0], st.restart_intervals))
    if not head_resolved and np.any(accepted[partial] < lat.rate):
        boundaries.append(st.starts[1:][jump & (accepted >= lat.rate)])
    if lat.step_s < _COARSE_STEP_S:
        cut = st.restart_intervals[jump[st.restart_intervals]]
        boundaries.append(st.starts[cut + 1])
    for i in st.restart_intervals:
        restart = st.bounds[i + 1] - (st.u[i + 1] if i + 1 < st.u.size else 0.5)
        if restart - st.bounds[i] < 3 * STAMP_RESOLUTION_S or (
                st.bounds[i] + 1.0 - restart < 3 * STAMP_RESOLUTION_S):
            boundaries.append(np.array([st.starts[i], min(st.starts[i] + lat.rate,
                                                          st.starts[i + 1])]))
    if not boundaries:
        return np.zeros(0, dtype=np.int64)
    edge = np.concatenate(boundaries)
    near = np.unique((edge[:, None] + np.arange(-2, 2)[None, :]).ravel())
    found = np.searchsorted(positions, near)  # positions increase
    found = found[found < positions.size]
    return np.unique(found[np.isin(positions[found], near)])


def _reached(st: _Structure, lat: _Lattice, sync_rows: np.ndarray, start: float) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """When the count reached each record's row: between the previous row and that row.

    Returns (time, width, segment and u of both rows, slot offsets of both rows): the model
    time is the midpoint, and the width (up to a second between bursts) its spread.
    """
    t_next, i_next, off_next = _row_times(st, lat, sync_rows)
    prev = np.maximum(sync_rows - 1, 0)
    t_prev, i_prev, off_prev = _row_times(st, lat, prev)
    t_prev = np.where(sync_rows > 0, t_prev, start)
    return (0.5 * (t_prev + t_next), t_next - t_prev, np.stack([i_prev, i_next]),
            np.stack([off_prev, off_next]), t_prev, t_next, sync_rows > 0)


def _fit(st: _Structure, lat: _Lattice, to: np.ndarray, sync_rows: np.ndarray,
         sigma: np.ndarray, anchor_seed: np.ndarray, anchor_sigma: np.ndarray,
         fit_rate: bool, restart_intervals: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least squares for the restart instants ``A_g`` and the RTC rate.

    Unknowns are corrections to the stamps (keeping unix-time magnitudes out of the solver)
    and the rate.  A row sits at ``A_g + u (1 + rate) + c`` (``c``: its place in the second).
    Equations, each divided by its spread:

    * priors: each ``A_g`` at its stamp (``start_ts`` or the restart's ``To``); the rate
      near nominal (``RTC_PRIOR_PPM``);
    * records: the count reached its row at ``To``, i.e. ``To`` lies between the previous
      row and that row.  A narrow interval (below twice the stamp spread) is fitted at its
      midpoint with the interval's own spread added; a wide one (bursts, latched readings)
      pulls only when ``To`` falls outside it, toward the nearer end (iterated);
    * continuity: at a restart whose second stayed below ``rate`` rows, a uniform lattice
      runs on, so the new segment's first row follows the last one by a step.
    """
    n_anchor = anchor_seed.size
    columns = n_anchor + (1 if fit_rate else 0)
    segment, u = st.segment, st.u

    def time_row(interval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Design row (per unknown) and the constant part of the row opening ``interval``."""
        row = np.zeros((interval.size, columns))
        row[np.arange(interval.size), segment[interval]] = 1.0
        if fit_rate:
            row[:, -1] = u[interval]
        return row, anchor_seed[segment[interval]] + u[interval]

    _, width, intervals, offsets, _, _, _ = _reached(st, lat, sync_rows, float(anchor_seed[0]))
    narrow = width < 2.0 * sigma
    prev_row, prev_const = time_row(intervals[0])
    next_row, next_const = time_row(intervals[1])
    prev_const = prev_const + offsets[0]
    next_const = next_const + offsets[1]

    fixed_rows: list[np.ndarray] = []
    fixed_target: list[np.ndarray] = []
    prior = np.zeros((n_anchor, columns))
    prior[np.arange(n_anchor), np.arange(n_anchor)] = 1.0 / anchor_sigma[:, None].ravel()
    fixed_rows.append(prior)
    fixed_target.append(np.zeros(n_anchor))
    if fit_rate:
        rate_prior = np.zeros((1, columns))
        rate_prior[0, -1] = 1.0 / (RTC_PRIOR_PPM * 1e-6)
        fixed_rows.append(rate_prior)
        fixed_target.append(np.zeros(1))
    spread = np.sqrt(sigma**2 + width**2 / 12.0)[narrow]
    fixed_rows.append(0.5 * (prev_row + next_row)[narrow] / spread[:, None])
    fixed_target.append((to - 0.5 * (prev_const + next_const))[narrow] / spread)
    if lat.continuous and restart_intervals.size:
        rows_in = st.accepted[restart_intervals]  # lattice slots used, drops included
        uncapped = rows_in < lat.rate
        i = restart_intervals[uncapped]
        if i.size:
            after_row, after_const = time_row(i + 1)
            before_row, before_const = time_row(i)
            lhs = after_row - before_row
            rhs = (before_const + st.phase[i] + rows_in[uncapped] * lat.step_s
                   - after_const - st.phase[i + 1])
            fixed_rows.append(lhs / (2.0 * lat.step_s))
            fixed_target.append(rhs / (2.0 * lat.step_s))
    design0 = np.concatenate(fixed_rows)
    target0 = np.concatenate(fixed_target)

    wide = np.flatnonzero(~narrow)
    solution = np.linalg.lstsq(design0, target0, rcond=None)[0]
    active: np.ndarray | None = None
    for _ in range(10):
        if wide.size == 0:
            break
        t_prev = prev_const[wide] + prev_row[wide] @ solution
        t_next = next_const[wide] + next_row[wide] @ solution
        side = np.where(to[wide] < t_prev, -1, np.where(to[wide] > t_next, 1, 0))
        if active is not None and np.array_equal(side, active):
            break
        active = side
        pull = side != 0
        if not pull.any():
            break
        k = wide[pull]
        row = np.where((side[pull] < 0)[:, None], prev_row[k], next_row[k])
        const = np.where(side[pull] < 0, prev_const[k], next_const[k])
        design = np.concatenate([design0, row / sigma[k, None]])
        target = np.concatenate([target0, (to[k] - const) / sigma[k]])
        solution = np.linalg.lstsq(design, target, rcond=None)[0]
    anchors = anchor_seed + solution[:n_anchor]
    return anchors, float(solution[-1]) if fit_rate else 0.0


def _misfit(st: _Structure, lat: _Lattice, to: np.ndarray, sync_rows: np.ndarray,
            sigma: np.ndarray, anchors: np.ndarray, anchor_seed: np.ndarray,
            anchor_sigma: np.ndarray, rtc_rate: float) -> float:
    """Chi-square of the records and priors, with the loss ``_fit`` minimises: narrow
    intervals at their midpoint, wide ones by the distance of ``To`` outside them."""
    chi = float(np.sum(((anchors - anchor_seed) / anchor_sigma) ** 2))
    chi += (rtc_rate / (RTC_PRIOR_PPM * 1e-6)) ** 2
    if not to.size:
        return chi
    mid, width, _, _, t_prev, t_next, _ = _reached(st, lat, sync_rows, float(anchors[0]))
    narrow = width < 2.0 * sigma
    spread = np.sqrt(sigma**2 + width**2 / 12.0)
    outside = np.maximum(t_prev - to, 0.0) + np.maximum(to - t_next, 0.0)
    miss = np.where(narrow, (to - mid) / spread, outside / sigma)
    return chi + float(np.sum(miss**2))


def _check_interrupts(rec: SessionRecords, st: _Structure, notes: list[str]) -> None:
    """``SecondInterrupts`` against the modelled edges (the RTC phase assumption)."""
    edges = st.bounds[1:-1]
    for k, s in enumerate(rec.syncs):
        if s.second_interrupts is None:
            continue
        modelled = int(np.searchsorted(edges, s.to_ts, side="right"))
        if abs(modelled - s.second_interrupts) > 1:
            notes.append(f"sync record {k}: the meter counted {s.second_interrupts} RTC "
                         f"interrupts, the model {modelled}: RTC phase assumption off")


def _check_offsets(rec: SessionRecords, notes: list[str]) -> None:
    """The logged ``Offset of`` is ``(goal - total) / rate`` (§6.5): else a record is garbled."""
    for k, s in enumerate(rec.syncs):
        expected = (s.goal - s.total) / rec.rate
        if abs(expected - s.offset_s) > 1.5e-3 + 1e-6 * abs(expected):
            notes.append(f"sync record {k}: Offset of {s.offset_s} s does not match "
                         f"(goal - total)/rate = {expected:.4f} s")

