"""The sampling engine: which instants a meter samples, what it records, and the ring buffer.

Intent
------
``SamplingEngine`` turns a session (measures, rate) into the exact float32 rows firmware 2.2
would put into its ring buffer, sampled from the shared ``GridModel`` at the **true** instants
the meter's oscillators dictate, and keeps the ground truth of every delivered row.

Three clocks, as on the device (timing-pitfalls.md):

* the **ADE9000 sample clock**, a crystal with its own error ``ade_drift_ppm``: kept sample
  ``q`` of a session is taken at true time ``start + q * k / internal / (1 + ade_ppm*1e-6)``
  (ADE sample 0 coincides with the session start);
* the **DS3231 RTC**, with its own error ``rtc_drift_ppm``, whose 1 Hz interrupt resets the
  per-second counter (§4.10);
* the ESP32's **software clock** (``MeterClock``: the NTP-set clock with ``clock_offset_s`` /
  ``drift_ppm``), which gives ``startTs``/``start_ts`` and all logged times, times the
  per-second rate log (``micros()``, §4.7) and drives the latched-mode hardware timer (§4.11).

RTC phase (inferred from the firmware and the DS3231 data sheet, not measured): the
DS3231's countdown chain restarts whenever its seconds register is written, and its 1 Hz
output then goes high 500 ms later (data sheet, "Clock and Calendar").  The firmware writes
that register (``Rtc::enableRTCSqwv`` → ``adjust``) every time sampling starts
(``startSampling``/``startLatchedSampling`` → ``setupSqwvInterrupt``), and on every NTP
success that runs on the main core (``TimeHandler::_updateNTPTime`` → ``Rtc::setTime``,
§6.2: the ``ntp`` command without ``bg``, ``timeServer``, the sync inside a scheduled
``sample``; not ``ntp`` with ``bg:true``).  ``sqwvTriggered`` handles a second on each rising
edge.  So the RTC seconds of a session begin ``0.5 s, 1.5 s, 2.5 s, …`` (RTC time) after its
start, whatever the NTP clock reads, and a blocking NTP sync during sampling restarts them
0.5 s after the sync: the second in progress is then shortened or stretched (a stretched
second refuses the ADE samples beyond ``rate``).  ``RTC_FIRST_EDGE_S`` holds the 0.5 s.

Waveform path (v,i modes), §4.3, §4.10:
  * The ADE9000 delivers samples at 8000 Hz (rate <= 8000) or 32000 Hz; every k-th is kept,
    ``k = internal // rate`` wrapped to 8 bits (``protocol.decimation``).  ``decimation_rate``
    lets the port-54322 auto stream inherit the previous command's k (§7.1, §12 #25).
  * At most ``rate`` kept samples are accepted per RTC second; the counter starts at the
    session start and restarts at each RTC second, so rates such as 1..25 and 128..6400
    arrive as bursts at the start of each second (§12 #16).  Kept samples beyond ``rate``
    are refused unread; for rates whose kept lattice runs at exactly ``rate`` (the uniform
    rates) the truth lists their instants (``rtc_drops``): they happen when the ADE runs
    fast against the RTC or an RTC second is stretched.  Without an RTC the counter is
    never reset: a session produces ``rate`` samples and then nothing (§4.10, §12 #17).
  * At each RTC second, if 1..4 samples are missing from the second that ended, copies of the
    last converted values are appended (``data[0..]``: L1 values even in v,i_L2/L3 modes).
    These "filler" rows are written but not counted in ``samples`` (§4.10, §12 #18).
Latched path (p,q and v,i_RMS), §4.11:
  * A timer fires every ``1_000_000 // rate`` us of the ESP clock (first at start + period).
    With an RTC, at each RTC second one reading is taken immediately and the timer restarts,
    stopping after ``rate`` readings in that second; without an RTC the timer simply runs on.
  * Readings are the RMS/power registers: ``GridModel.snapshot_arrays`` at the instant.
NTP corrections, §6.5 (§12 #19):
  * Whenever the running sample count modulo ``rate`` equals 1 before a sample is stored, one
    pending positive correction stores that sample twice and a pending negative one stores
    it not at all; the count does not advance on a drop, so drops are consecutive.  With
    ``rate == 1`` the condition can never hold and corrections stay pending forever.
Per-second rate log, §4.7:
  * Every ``rate`` accepted samples (waveform) or when the ``rate``-th reading of an RTC
    second is taken (latched; every reading from the ``rate``-th on without an RTC) the
    firmware notes ``micros()``; ``rate_mark`` gives the true instants of the last two such
    marks, and the meter turns them into ``rate / (ESP seconds between them)``.

Ground truth (``SessionTruth``): for every delivered stream index its true instant (fillers:
the true instant of the RTC interrupt that appended them; correction duplicates: the instant
of the sample they copy) and kind, the RTC interrupts and resets, the refused and the
correction-dropped ADE sample instants, and the §6.5 records.  Arrays only, no per-sample
objects.  Values carry per-meter measurement noise (deterministic per sample index) and are
quantised to the ADE9000 register LSBs of Appendix A before the cast to ``'<f4'``.

Limits
------
* The drifts are constant within a session (read at its start); no temperature effects.
* ADE sample 0 coincides with the session start (the real ADE phase is arbitrary; the
  firmware's 8-bit leave-out counter even carries over from the previous session).
* The RTC reset is taken at the session's first instant and at the sync's completion; the
  few hundred microseconds of I2C traffic are not modelled.
* Fillers precede the first reading of the new second in latched mode (two cores race there).
* The ring-buffer wrap-around corruption (§4.10, §12 #20) is not modelled.
* Grid, noise and quantisation are computed in float64; rows are float32 like the wire.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ..protocol import RING_BUFFER_BYTES, Decimation, Measures, decimation, rate_problem
from ._clock import MeterClock
from ._grid import GridModel, hash_u64, mix_u64

__all__ = [
    "CORRECTION_CAP",
    "KIND_DUPLICATE",
    "KIND_FILLER",
    "KIND_SAMPLE",
    "RTC_FIRST_EDGE_S",
    "RingBuffer",
    "SamplingEngine",
    "SessionTruth",
    "SyncRecord",
]

logger = logging.getLogger(__name__)

CORRECTION_CAP: Final = 10
"""``MAX_CORRECT_SAMPLES``: a single NTP sync queues at most +-10 samples (§6.5)."""

FILLER_LIMIT: Final = 5
"""The RTC interrupt fills a second only if fewer than 5 samples are missing (§4.10)."""

KIND_SAMPLE: Final = 0
KIND_DUPLICATE: Final = 1
"""Second copy of a sample stored by a positive NTP correction (§6.5)."""
KIND_FILLER: Final = 2
"""Copy of the last converted values appended by the RTC interrupt (§4.10)."""

RTC_FIRST_EDGE_S: Final = 0.5
"""Time from a write of the DS3231's seconds register to the rising edge of its 1 Hz output,
where the firmware handles a second (data sheet; see the module docstring)."""

# Appendix A: per-LSB values of the ADE9000 registers the firmware converts.
_LSB_WAVE_V: Final = 994.7 / 67_107_786 / 2
_LSB_WAVE_MA: Final = 127.065 / 67_107_786 * 1000 / 4
_LSB_RMS_V: Final = 994.7 / 52_702_092 * math.sqrt(2) / 2 / 2
_LSB_RMS_MA: Final = 127.065 / 52_702_092 * math.sqrt(2) * 1000 / 4 / 2
_LSB_POWER: Final = 994.7 * 127.065 / (20_694_066 * 2) / 8

# One-sigma measurement noise per quantity (a 24-bit ADC behind real sensors).
_NOISE_WAVE_V: Final = 0.05
_NOISE_WAVE_MA: Final = 1.5
_NOISE_RMS_V: Final = 0.01
_NOISE_RMS_MA: Final = 0.5
_NOISE_POWER: Final = 0.3

_WAVE_LSB = np.array([_LSB_WAVE_V, _LSB_WAVE_MA] * 3)
_WAVE_NOISE = np.array([_NOISE_WAVE_V, _NOISE_WAVE_MA] * 3)
_RMS_LSB = np.array([_LSB_RMS_V] * 3 + [_LSB_RMS_MA] * 3)
_RMS_NOISE = np.array([_NOISE_RMS_V] * 3 + [_NOISE_RMS_MA] * 3)
_POWER_LSB = np.array([_LSB_POWER] * 6)
_POWER_NOISE = np.array([_NOISE_POWER] * 6)

_WAVE_COLUMNS: Final[dict[Measures, slice]] = {
    Measures.VI: slice(0, 6),
    Measures.VI_L1: slice(0, 2),
    Measures.VI_L2: slice(2, 4),
    Measures.VI_L3: slice(4, 6),
}
_TRIANGULAR_SIGMA: Final = 1.0 / math.sqrt(6.0)
_EDGE_S: Final = 5e-7
"""Time tolerance (s) for "is this instant due / past this RTC edge": absorbs the rounding
of float64 unix times (0.24 us ulp in this era).  A sample this close before an edge
counts as on it."""
_CHANNEL_OFFSETS: Final = np.arange(6, dtype=np.int64)

_Piece = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(rows, true instants, kinds) of consecutive stream rows."""


@dataclass(frozen=True)
class SyncRecord:
    """One §6.5 sync record as the meter logged it, with the true instant it was taken."""

    true_time: float
    """True instant of the record (right after the NTP sync completed)."""
    goal: int
    """``Should be: <goal>``."""
    total: int
    """``is <total> samples``: the firmware's sample count at that instant."""
    offset_s: float
    """``Offset of <s> s``: ``(goal - total) / rate``."""
    duration_s: float
    """``SamplingDur``: ``To - From`` in whole milliseconds."""
    queued: int
    """Samples queued by ``Correcting: <n> samples`` (0 below the 9 ms threshold)."""


@dataclass
class SessionTruth:
    """Ground truth of one session: exactly the rows ``produce`` returned, and their origin.

    "Stream index" ``i`` is the row's position in the delivered stream (``values[i]``, the
    ring buffer's order: what the meter sends).
    """

    true_start: float
    """True instant of the session start (ADE sample 0, RTC reset, counters zeroed)."""
    meter_start_ts: float
    """The software clock at the start (``start_ts`` before millisecond formatting)."""
    clock_offset_s: float
    """Software clock minus true time at the start."""
    drift_ppm: float
    """The software (ESP) clock's drift."""
    rate: int
    measures: Measures
    samples_produced: int
    """The stop reply's ``samples``: counts correction duplicates, not RTC fillers (§4.8)."""
    values: np.ndarray
    """float32 (n, channels): concatenation of everything ``produce`` returned."""
    true_times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64 (n,): true instant of each stream index: when its values were sampled; for a
    correction duplicate the instant of the sample it copies; for an RTC filler the instant
    of the RTC interrupt that appended it (its values are those of the last converted sample
    before it, possibly from an earlier session)."""
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    """uint8 (n,): KIND_SAMPLE, KIND_DUPLICATE or KIND_FILLER."""
    correction_drops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64: true instants of samples read but not stored by negative §6.5 corrections."""
    rtc_drops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64: true instants of ADE samples refused by the per-second counter (§4.10), for
    rates whose kept lattice runs at ``rate`` (bursty rates refuse by design: not listed)."""
    rtc_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64: true instants of the handled RTC interrupts (each starts a new second)."""
    rtc_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """int64, one per ``rtc_edges``: samples accepted in the second that interrupt ended
    (the firmware's ``testSamples``; fillers make up 1..4 missing ones)."""
    rtc_resets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64: true instants the RTC countdown restarted (session start, blocking NTP)."""
    sync_records: tuple[SyncRecord, ...] = ()
    """The §6.5 records logged during the session, in order."""
    ade_drift_ppm: float = 0.0
    rtc_drift_ppm: float = 0.0
    decimation: Decimation | None = None
    """The waveform decimation in use (None on the latched path)."""
    rtc: bool = True
    circuit: int = 0

    @property
    def filler_indices(self) -> np.ndarray:
        """Stream indices of RTC filler rows (§4.10)."""
        return np.flatnonzero(self.kinds == KIND_FILLER)

    @property
    def correction_duplicates(self) -> np.ndarray:
        """Stream indices of the second copies stored by positive §6.5 corrections."""
        return np.flatnonzero(self.kinds == KIND_DUPLICATE)

    @property
    def dropped_true_times(self) -> np.ndarray:
        """Former name of ``correction_drops``."""
        return self.correction_drops

    @property
    def filler_samples(self) -> int:
        return int(np.count_nonzero(self.kinds == KIND_FILLER))

    def true_time_of(self, index: int | np.ndarray) -> float | np.ndarray:
        """True instant(s) of stream index/indices (see ``true_times``)."""
        result = self.true_times[index]
        return float(result) if np.ndim(result) == 0 else result


class SamplingEngine:
    """Produces a meter's samples for one session at a time (see the module docstring)."""

    def __init__(
        self,
        grid: GridModel,
        clock: MeterClock,
        *,
        circuit: int,
        noise_seed: int,
        rtc: bool = True,
        keep_truth: bool = True,
        name: str = "meter",
        ade_drift_ppm: float = 0.0,
        rtc_drift_ppm: float = 0.0,
    ) -> None:
        self.grid = grid
        self.clock = clock
        self.circuit = int(circuit)
        self.noise_seed = int(noise_seed)
        self.rtc = rtc
        self.keep_truth = keep_truth
        self.name = name
        self.ade_drift_ppm = _check_ppm(ade_drift_ppm, "ade_drift_ppm", name)
        """The ADE9000 crystal's error; takes effect at the next session start."""
        self.rtc_drift_ppm = _check_ppm(rtc_drift_ppm, "rtc_drift_ppm", name)
        """The DS3231's error; takes effect at the next session start."""
        self._session_serial = -1
        self._active = False
        # The firmware's global ``float data[7]``: last converted values, shared by both
        # sampling paths and kept across sessions (RTC fillers copy it, §4.10).
        self._last_values = np.zeros(6, dtype=np.float32)
        self.samples_produced = 0
        self.start_meter_ts = 0.0
        self.start_true = 0.0
        self.rtc_interrupts = 0
        """RTC seconds handled in this session (the firmware's ``sqwCounter2``, §6.5)."""
        self.last_second_count = 0
        """Samples accepted in the last RTC second that ended (``testSamples``, §4.7)."""
        self.rate_marks = 0
        """How many per-second rate marks (§4.7) this session has passed."""

    # ------------------------------------------------------------------ session control

    @property
    def active(self) -> bool:
        return self._active

    @property
    def measures(self) -> Measures:
        self._require_session()
        return self._measures

    @property
    def rate(self) -> int:
        self._require_session()
        return self._rate

    @property
    def pending_correction(self) -> int:
        return self._pending

    @property
    def produced_until(self) -> float:
        """True time of the last ``produce`` call (the session start before any)."""
        return self.start_true + max(0.0, self._last_u)

    @property
    def rate_mark(self) -> tuple[float, float]:
        """True instants (previous, last) of the two latest rate marks (§4.7); before the
        first mark both are the session start."""
        return self._mark_prev, self._mark_last

    def start(
        self,
        measures: Measures,
        rate: int,
        *,
        decimation_rate: int | None = None,
        at_true: float | None = None,
        force_waveform: bool = False,
    ) -> None:
        """Begin a session at true time ``at_true`` (default: now).

        ``force_waveform`` (additive) runs the waveform path even for latched labels: a
        scheduled start of p,q / v,i_RMS streams raw v,i values (§6.4, §12 #23); the rows
        then have six channels v1,i1,v2,i2,v3,i3 and ``decimation_rate`` picks k.
        """
        if not isinstance(measures, Measures):
            raise TypeError(f"{self.name}: measures must be a Measures, not {measures!r}")
        waveform = force_waveform or not measures.latched
        if force_waveform and measures.latched:
            if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
                raise ValueError(f"{self.name}: rate must be a positive integer, not {rate!r}")
        else:
            problem = rate_problem(rate, measures)
            if problem is not None:
                raise ValueError(f"{self.name}: {problem}")
        if waveform:
            source = rate if decimation_rate is None else decimation_rate
            try:
                self._decimation: Decimation | None = decimation(source)
            except ValueError as exc:
                raise ValueError(f"{self.name}: decimation rate {source}: {exc}") from None
        else:
            self._decimation = None
        self._measures = measures
        self._rate = int(rate)
        self._waveform = waveform
        self.start_true = float(self.clock.true_now() if at_true is None else at_true)
        self.start_meter_ts = self.clock.meter_time(self.start_true)
        self._start_offset = self.clock.offset_at(self.start_true)
        self._drift_ppm = self.clock.drift_ppm
        self._esp_rate = self.clock.rate
        self._ade_ppm, self._rtc_ppm = self.ade_drift_ppm, self.rtc_drift_ppm
        self._rtc_second = 1.0 / (1.0 + self._rtc_ppm * 1e-6)  # true seconds per RTC second
        if self._decimation is not None:
            dec = self._decimation
            self._lattice_step = dec.keep_every / dec.internal_rate / (1.0 + self._ade_ppm * 1e-6)
            self._list_refusals = dec.internal_rate == dec.keep_every * self._rate
            lattice_rate = dec.internal_rate / dec.keep_every
            self._block_size = int(min(max(64.0, 0.25 * lattice_rate), 8192.0))
        else:
            self._timer_period = (1_000_000 // self._rate) * 1e-6 / self._esp_rate
            self._list_refusals = False
        # RTC: seconds begin RTC_FIRST_EDGE_S + n RTC seconds after the last reset.
        self._rtc_origin = 0.0
        self._rtc_n = 0
        self._interval = 0
        self._count = 0  # accepted in the current RTC second (the ISR's counter)
        self._accepted = 0  # accepted since the start (waveform), readings (latched)
        self._next_index = 0  # next kept-lattice index (waveform)
        self._timer_origin = 0.0  # latched: timer (re)start, seconds after the start
        self._timer_next = 1
        self._timer_last = self._rate if self.rtc else 2**62
        self._last_u = -math.inf
        self._total = 0
        self._pending = 0
        self.samples_produced = 0
        self.rtc_interrupts = 0
        self.rate_marks = 0
        self._mark_prev = self._mark_last = self.start_true
        self._session_serial += 1
        self._noise_key = hash_u64(self.noise_seed, self._session_serial)[0]
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._truth_values: list[np.ndarray] = []
        self._truth_times: list[np.ndarray] = []
        self._truth_kinds: list[np.ndarray] = []
        self._correction_drops: list[np.ndarray] = []
        self._rtc_drops: list[np.ndarray] = []
        self._rtc_edges: list[float] = []
        self._rtc_counts: list[int] = []
        self._rtc_resets: list[float] = [self.start_true] if self.rtc else []
        self._sync_records: list[SyncRecord] = []
        self._active = True
        logger.debug(
            "%s: session %s at %s Hz (decimation %s, rtc=%s) starts at true %.6f, meter %.6f",
            self.name, measures.value, rate, self._decimation, self.rtc,
            self.start_true, self.start_meter_ts,
        )

    def stop(self) -> None:
        """End the session (further ``produce`` calls are an error until ``start``)."""
        self._active = False

    def queue_correction(self, n: int) -> None:
        """Queue an NTP rate correction of ``n`` samples, capped to +-10 per call (§6.5)."""
        self._require_session()
        capped = max(-CORRECTION_CAP, min(CORRECTION_CAP, int(n)))
        self._pending += capped

    def record_sync(self, record: SyncRecord) -> None:
        """Keep a §6.5 record in the session's ground truth."""
        self._require_session()
        self._sync_records.append(record)

    def reset_rtc(self, at_true: float) -> None:
        """The RTC's seconds register was written at ``at_true`` (NTP success on the main
        core, §6.2): its seconds restart ``RTC_FIRST_EDGE_S`` later.  Call ``produce`` up to
        ``at_true`` first; the second in progress keeps its count."""
        self._require_session()
        if not self.rtc:
            return
        u = max(at_true - self.start_true, self._last_u)
        self._rtc_origin = u
        self._rtc_n = 0
        self._rtc_resets.append(self.start_true + u)

    def _require_session(self) -> None:
        if not self._active:
            raise RuntimeError(f"{self.name}: no sampling session is running")

    # ------------------------------------------------------------------ production

    def _next_edge(self) -> float:
        """Seconds after the start of the next RTC interrupt (inf without an RTC)."""
        if not self.rtc:
            return math.inf
        return self._rtc_origin + (RTC_FIRST_EDGE_S + self._rtc_n) * self._rtc_second

    def produce(self, true_now: float) -> np.ndarray:
        """float32 (n, channels): every row stored up to ``true_now`` since the last call."""
        self._require_session()
        u_now = true_now - self.start_true
        if u_now < self._last_u:
            raise ValueError(
                f"{self.name}: produce() went back in time ({true_now:.6f} is before the "
                "previous call)"
            )
        self._last_u = u_now
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        while True:
            edge = self._next_edge()
            if self._waveform:
                self._take_lattice(u_now, edge, pieces)
            else:
                self._take_timer(u_now, edge, pieces)
            if edge > u_now + _EDGE_S:
                break
            self._close_second(edge, pieces)

        if not pieces:
            return np.zeros((0, self._width()), dtype="<f4")
        values = np.concatenate([p[0] for p in pieces]) if len(pieces) > 1 else pieces[0][0]
        if self.keep_truth:
            self._truth_values.append(values)
            self._truth_times.append(np.concatenate([p[1] for p in pieces]))
            self._truth_kinds.append(np.concatenate([p[2] for p in pieces]))
        self.samples_produced = self._total
        return values

    def _columns_of_rows(self) -> slice:
        if self._waveform:
            return _WAVE_COLUMNS.get(self._measures, slice(0, 6))
        return slice(0, 6)

    def _width(self) -> int:
        columns = self._columns_of_rows()
        return int(columns.stop - columns.start)

    # -- which instants are due

    def _take_lattice(self, u_now: float, edge: float, pieces: list[_Piece]) -> None:
        """Accept the due kept-lattice samples before ``edge`` while the counter allows."""
        step = self._lattice_step
        stop = math.floor((u_now + _EDGE_S) / step) + 1
        if edge != math.inf:
            stop = min(stop, math.ceil((edge - _EDGE_S) / step))  # strictly before the edge
        first = self._next_index
        if stop <= first:
            return
        room = self._rate - (self._count if self.rtc else self._accepted)
        take = max(0, min(stop - first, room))
        self._next_index = stop
        if take < stop - first and self._list_refusals and self.rtc and self.keep_truth:
            refused = np.arange(first + take, stop, dtype=np.int64)
            self._rtc_drops.append(self.start_true + refused * step)
        if take == 0:
            return
        self._count += take
        before = self._accepted
        self._accepted += take
        self._mark(before, first, step)
        pieces.append(self._store_samples(np.arange(first, first + take, dtype=np.int64)))

    def _mark(self, before: int, first: int, step: float) -> None:
        """Waveform rate marks (§4.7): the firmware notes micros() at every ``rate``-th
        accepted sample (its counter is reset only there, not by the RTC)."""
        rate = self._rate
        marks = self._accepted // rate - before // rate
        if marks <= 0:
            return
        last_count = self._accepted // rate * rate
        t_last = self.start_true + (first + last_count - before - 1) * step
        self._mark_prev = t_last - rate * step if marks >= 2 else self._mark_last
        self._mark_last = t_last
        self.rate_marks += marks

    def _take_timer(self, u_now: float, edge: float, pieces: list[_Piece]) -> None:
        """Latched readings due before ``edge`` (§4.11): every timer period from the origin."""
        period, origin = self._timer_period, self._timer_origin
        last = min(math.floor((u_now + _EDGE_S - origin) / period), self._timer_last)
        if edge != math.inf:
            last = min(last, math.ceil((edge - _EDGE_S - origin) / period) - 1)
        first = self._timer_next
        if last < first:
            return
        index = np.arange(first, last + 1, dtype=np.int64)
        self._timer_next = last + 1
        n = index.shape[0]
        before = self._count if self.rtc else self._accepted
        self._count += n
        self._accepted += n
        # The ISR's counter reaching ``rate`` notes micros() (§4.7).  With an RTC that
        # happens once per second (the timer then stops); without one the counter is never
        # reset, so every reading from the rate-th on is a mark.
        rate = self._rate
        if self.rtc:
            marked = [rate - before - 1] if before < rate <= before + n else []
        else:
            marked = list(range(max(0, rate - before - 1), n))[-2:]
        if marked:
            times = self.start_true + origin + index[marked] * period
            self._mark_prev = float(times[-2]) if len(marked) == 2 else self._mark_last
            self._mark_last = float(times[-1])
            self.rate_marks += 1 if self.rtc else n - max(0, rate - before - 1)
        keys = self._interval * 1_000_003 + index
        pieces.append(self._store_samples(keys, origin + index * period))

    def _close_second(self, edge: float, pieces: list[_Piece]) -> None:
        """The RTC interrupt at ``edge`` (seconds after the start): fillers, counter reset."""
        missing = self._rate - self._count
        t_edge = self.start_true + edge
        if 0 < missing < FILLER_LIMIT:
            pieces.append(self._fillers(missing, t_edge))
        self._rtc_edges.append(t_edge)
        self._rtc_counts.append(self._count)
        self.last_second_count = self._count
        self.rtc_interrupts += 1
        self._rtc_n += 1
        self._interval += 1
        self._count = 0
        if not self._waveform:
            # One reading at once, then the timer restarts and stops after `rate` (§4.11).
            self._timer_origin, self._timer_next, self._timer_last = edge, 0, self._rate - 1

    # -- values

    def _measure(self, keys: np.ndarray, offsets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Full-width (n, 6) float32 register values and their true instants."""
        if self._waveform:
            return self._waveform_rows(keys)
        assert offsets is not None
        t_true = self.start_true + offsets
        return self._evaluate(t_true, keys), t_true

    def _evaluate(self, t_true: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Grid values at ``t_true`` plus noise keyed by ``keys``, quantised, as float32."""
        if self._waveform:
            raw = self.grid.interleaved(t_true, self.circuit)
            lsb, sigma = _WAVE_LSB, _WAVE_NOISE
        else:
            snap = self.grid.snapshot_arrays(t_true, self.circuit)
            if self._measures is Measures.PQ:
                raw = np.concatenate([snap["active_power"], snap["reactive_power"]], axis=1)
                lsb, sigma = _POWER_LSB, _POWER_NOISE
            else:
                raw = np.concatenate([snap["voltage_rms"], snap["current_rms"]], axis=1)
                lsb, sigma = _RMS_LSB, _RMS_NOISE
        raw += self._noise(keys) * (sigma / _TRIANGULAR_SIGMA)
        rows: np.ndarray = (np.rint(raw / lsb) * lsb).astype("<f4")
        return rows

    def _waveform_rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows for kept-lattice indices ``keys`` (ascending), served from look-ahead blocks.

        Blocks cover fixed index ranges ``[b*B, (b+1)*B)``, so every value is computed in the
        same block whatever the call pattern: results are bit-identical for any batching,
        and there is one grid evaluation per ~0.25 s of samples instead of one per call.
        """
        size = self._block_size
        first, last = int(keys[0]) // size, int(keys[-1]) // size
        if first == last:
            values, times = self._block(first)
            local = keys - first * size
            return values[local], times[local]
        blocks = [self._block(b) for b in range(first, last + 1)]
        values = np.concatenate([blk[0] for blk in blocks])
        times = np.concatenate([blk[1] for blk in blocks])
        local = keys - first * size
        return values[local], times[local]

    def _block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._blocks.get(number)
        if cached is None:
            index = np.arange(number * self._block_size, (number + 1) * self._block_size,
                              dtype=np.int64)
            times = self.start_true + index * self._lattice_step
            cached = (self._evaluate(times, index), times)
            if len(self._blocks) >= 3:
                del self._blocks[min(self._blocks)]
            self._blocks[number] = cached
        return cached

    def _noise(self, keys: np.ndarray) -> np.ndarray:
        """(n, 6) triangular noise in (-1, 1), a pure function of (seed, session, key, channel)."""
        counters = (keys[:, None] * 8 + _CHANNEL_OFFSETS).view(np.uint64)
        h = mix_u64(counters ^ self._noise_key)
        low = (h & np.uint64(0xFFFFFFFF)).astype(np.float64)
        high = (h >> np.uint64(32)).astype(np.float64)
        return (low + high) * (1.0 / 2**32) - 1.0

    def _store_samples(self, keys: np.ndarray, offsets: np.ndarray | None = None) -> _Piece:
        """Read (convert) the accepted samples and store them, applying §6.5 corrections."""
        full, t_true = self._measure(keys, offsets)
        self._last_values = full[-1].copy()  # data[]: even a correction-dropped sample
        columns = self._columns_of_rows()
        n = full.shape[0]
        if self._pending == 0 or self._rate == 1:
            self._total += n
            rows = full if columns == slice(0, 6) else full[:, columns]
            return np.ascontiguousarray(rows), t_true, np.zeros(n, dtype=np.uint8)
        order, kinds, dropped = self._apply_corrections(n)
        if dropped.size and self.keep_truth:
            self._correction_drops.append(t_true[dropped])
        return np.ascontiguousarray(full[order][:, columns]), t_true[order], kinds

    def _fillers(self, count: int, t_edge: float) -> _Piece:
        width = self._width()
        # data[0..]: the first channels of the firmware's value array (§4.10).
        rows = np.repeat(self._last_values[None, :width], count, axis=0)
        return rows, np.full(count, t_edge), np.full(count, KIND_FILLER, dtype=np.uint8)

    def _apply_corrections(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row order (with duplicates/omissions), kinds, and dropped positions (§6.5)."""
        order: list[np.ndarray] = []
        kinds: list[np.ndarray] = []
        dropped: list[int] = []
        i = 0
        while i < n:
            j = i + (1 - self._total) % self._rate  # next sample stored with count % rate == 1
            if self._pending == 0 or j >= n:
                order.append(np.arange(i, n))
                kinds.append(np.zeros(n - i, dtype=np.uint8))
                self._total += n - i
                break
            order.append(np.arange(i, j))
            kinds.append(np.zeros(j - i, dtype=np.uint8))
            self._total += j - i
            if self._pending > 0:
                order.append(np.array([j, j]))
                kinds.append(np.array([KIND_SAMPLE, KIND_DUPLICATE], dtype=np.uint8))
                self._total += 2
                self._pending -= 1
            else:
                dropped.append(j)
                self._pending += 1
            i = j + 1
        return (
            np.concatenate(order) if order else np.zeros(0, dtype=np.int64),
            np.concatenate(kinds) if kinds else np.zeros(0, dtype=np.uint8),
            np.array(dropped, dtype=np.int64),
        )

    # ------------------------------------------------------------------ ground truth

    def truth(self) -> SessionTruth:
        """Everything ``produce`` returned in this (or the last) session, with its origin."""
        if self._session_serial < 0:
            raise RuntimeError(f"{self.name}: no sampling session has been started")
        if not self.keep_truth:
            raise RuntimeError(f"{self.name}: ground truth disabled (keep_truth=False)")

        def joined(parts: list[np.ndarray], dtype: type = np.float64) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        values = (
            np.concatenate(self._truth_values)
            if self._truth_values
            else np.zeros((0, self._width()), dtype="<f4")
        )
        return SessionTruth(
            true_start=self.start_true,
            meter_start_ts=self.start_meter_ts,
            clock_offset_s=self._start_offset,
            drift_ppm=self._drift_ppm,
            rate=self._rate,
            measures=self._measures,
            samples_produced=self._total,
            values=values,
            true_times=joined(self._truth_times),
            kinds=joined(self._truth_kinds, np.uint8),
            correction_drops=joined(self._correction_drops),
            rtc_drops=joined(self._rtc_drops),
            rtc_edges=np.array(self._rtc_edges, dtype=np.float64),
            rtc_counts=np.array(self._rtc_counts, dtype=np.int64),
            rtc_resets=np.array(self._rtc_resets, dtype=np.float64),
            sync_records=tuple(self._sync_records),
            ade_drift_ppm=self._ade_ppm,
            rtc_drift_ppm=self._rtc_ppm,
            decimation=self._decimation,
            rtc=self.rtc,
            circuit=self.circuit,
        )


def _check_ppm(value: float, what: str, name: str) -> float:
    if not -1e5 < value < 1e5:
        raise ValueError(f"{name}: {what} {value} is not a plausible crystal error")
    return float(value)


class RingBuffer:
    """The meter's 3.5 MiB sample FIFO as bytes (§4.10): byte accounting plus storage.

    ``write`` refuses (returns False, stores nothing) when the data would not fit; the caller
    logs the firmware's overflow error and reboots the meter.  Reads consume from the front.
    Storage is one ``bytearray`` with a read offset that is compacted lazily, so streaming
    1008-byte chunks costs O(bytes) overall, never O(n^2).
    """

    def __init__(self, capacity: int = RING_BUFFER_BYTES) -> None:
        if capacity <= 0:
            raise ValueError(f"ring buffer capacity must be positive, not {capacity}")
        self.capacity = capacity
        self._data = bytearray()
        self._head = 0
        self.bytes_written = 0
        """Total bytes accepted since construction (for statistics)."""

    @property
    def readable(self) -> int:
        return len(self._data) - self._head

    @property
    def free(self) -> int:
        return self.capacity - self.readable

    def __len__(self) -> int:
        return self.readable

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        size = len(data)
        if size > self.free:
            return False
        self._data += data
        self.bytes_written += size
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes from the front (fewer only if fewer are buffered)."""
        if n < 0:
            raise ValueError(f"cannot read a negative number of bytes ({n})")
        end = min(self._head + n, len(self._data))
        out = bytes(self._data[self._head:end])
        self._head = end
        if self._head >= len(self._data):
            self._data.clear()
            self._head = 0
        elif self._head > 65536 and self._head * 2 > len(self._data):
            del self._data[: self._head]
            self._head = 0
        return out

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes from the front without consuming them."""
        return bytes(self._data[self._head:self._head + max(0, n)])

    def read_all(self) -> bytes:
        return self.read(self.readable)

    def clear(self) -> None:
        self._data.clear()
        self._head = 0
