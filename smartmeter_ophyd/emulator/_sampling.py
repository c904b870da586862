"""The sampling engine: which instants a meter samples, what it records, and the ring buffer.

Intent
------
``SamplingEngine`` turns a session (measures, rate) into the exact float32 rows firmware 2.2
would put into its ring buffer, sampled from the shared ``GridModel`` at the **true** instants
the meter's own clock dictates.  The rules are those of the firmware's sampling tasks
(``V2.ino: isr_adc_ready, sample_timer_task, latched_sample_timer_task, sqwvTriggered``):

Waveform path (v,i modes), §4.3, §4.10:
  * The ADE9000 delivers samples at 8000 Hz (rate <= 8000) or 32000 Hz; every k-th is kept,
    ``k = internal // rate`` wrapped to 8 bits (``protocol.decimation``).  ``decimation_rate``
    lets the port-54322 auto stream inherit the previous command's k (§7.1, §12 #25).
  * At most ``rate`` kept samples are accepted per second.  With an RTC the counter is reset at
    every RTC second (the meter clock's whole seconds), so rates such as 1..25 and 128..6400
    arrive as bursts at the start of each second (§12 #16).  Without an RTC the counter is
    never reset: a session produces ``rate`` samples and then nothing (§4.10, §12 #17).
  * At each RTC second, if 1..4 samples are missing from the second that ended, copies of the
    last converted values are appended (``data[0..]``: L1 values even in v,i_L2/L3 modes).
    These "filler" rows are written but not counted in ``samples`` (§4.10, §12 #18).
Latched path (p,q and v,i_RMS), §4.11:
  * A timer fires every ``1_000_000 // rate`` us (first at start + period).  With an RTC, at
    each RTC second one reading is taken immediately and the timer restarts, stopping after
    ``rate`` readings in that second; without an RTC the timer simply runs on.
  * Readings are the RMS/power registers: ``GridModel.snapshot_arrays`` at the instant.
NTP corrections, §6.5 (§12 #19):
  * Whenever the running sample count modulo ``rate`` equals 1 before a sample is stored, one
    pending positive correction stores that sample twice and a pending negative one stores
    it not at all; the count does not advance on a drop, so drops are consecutive.  With
    ``rate == 1`` the condition can never hold and corrections stay pending forever.

Timing: the meter's sampling oscillator and RTC are modelled by the meter clock as it was at
session start (its offset and drift): sample ``q`` sits at meter time ``start + q*k/internal``,
mapped to true time through the clock's rate.  A drifting clock therefore samples at a truly
off rate.  Values carry per-meter measurement noise (deterministic per sample index) and are
quantised to the ADE9000 register LSBs of Appendix A before the cast to ``'<f4'``.

Limits
------
* An NTP step during a session does not move the sampling grid or the RTC second phase (the
  crystals keep running); only the §6.5 corrections react to it, as on the device.
* ADE sample 0 coincides with the session start (the real ADE phase is arbitrary).
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
    "RingBuffer",
    "SamplingEngine",
    "SessionTruth",
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


@dataclass
class SessionTruth:
    """Ground truth of one session: exactly the rows ``produce`` returned, and their origin."""

    true_start: float
    meter_start_ts: float
    clock_offset_s: float
    """Meter clock minus true time at the start."""
    drift_ppm: float
    rate: int
    measures: Measures
    samples_produced: int
    """The stop reply's ``samples``: counts correction duplicates, not RTC fillers (§4.8)."""
    values: np.ndarray
    """float32 (n, channels): concatenation of everything ``produce`` returned."""
    true_times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64 (n,): true instant each row's values were measured (NaN for fillers copying
    values from before this session)."""
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    """uint8 (n,): KIND_SAMPLE, KIND_DUPLICATE or KIND_FILLER."""
    dropped_true_times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """True instants of samples dropped by negative NTP corrections."""
    decimation: Decimation | None = None
    """The waveform decimation in use (None on the latched path)."""
    rtc: bool = True
    circuit: int = 0

    @property
    def filler_samples(self) -> int:
        return int(np.count_nonzero(self.kinds == KIND_FILLER))


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
    ) -> None:
        self.grid = grid
        self.clock = clock
        self.circuit = int(circuit)
        self.noise_seed = int(noise_seed)
        self.rtc = rtc
        self.keep_truth = keep_truth
        self.name = name
        self._session_serial = -1
        self._active = False
        # The firmware's global ``float data[7]``: last converted values, shared by both
        # sampling paths and kept across sessions (RTC fillers copy it, §4.10).
        self._last_values = np.zeros(6, dtype=np.float32)
        self._last_values_true = math.nan
        self.samples_produced = 0
        self.start_meter_ts = 0.0
        self.start_true = 0.0

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
        self._clock_rate = self.clock.rate
        self._start_offset = self.clock.offset_at(self.start_true)
        self._drift_ppm = self.clock.drift_ppm
        # Fraction of the meter second at start: RTC second s >= 1 begins s - phi after it.
        # Kept to the microsecond (the ESP's timer resolution) so that float noise in a
        # 1.7e9-second timestamp cannot move a sample across an RTC edge.
        self._phi = round(self.start_meter_ts - math.floor(self.start_meter_ts), 6)
        self._second = 0
        self._next_index = 0 if waveform else 1
        self._count_in_second = 0
        self._last_tau = -math.inf
        self._total = 0
        self._pending = 0
        self.samples_produced = 0
        self._session_serial += 1
        self._noise_key = hash_u64(self.noise_seed, self._session_serial)[0]
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if self._decimation is not None:
            lattice_rate = self._decimation.internal_rate / self._decimation.keep_every
            self._block_size = int(min(max(64.0, 0.25 * lattice_rate), 8192.0))
        self._truth_values: list[np.ndarray] = []
        self._truth_times: list[np.ndarray] = []
        self._truth_kinds: list[np.ndarray] = []
        self._dropped: list[float] = []
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

    def _require_session(self) -> None:
        if not self._active:
            raise RuntimeError(f"{self.name}: no sampling session is running")

    # ------------------------------------------------------------------ production

    def _tau(self, true_time: float) -> float:
        """Meter seconds elapsed since the session start at ``true_time``."""
        return (true_time - self.start_true) * self._clock_rate

    def _true_times(self, tau: np.ndarray) -> np.ndarray:
        return self.start_true + tau / self._clock_rate

    def _boundary(self, second: int) -> float:
        """Meter seconds from the start to the beginning of RTC second ``second`` (>= 1)."""
        return second - self._phi

    def produce(self, true_now: float) -> np.ndarray:
        """float32 (n, channels): every row stored up to ``true_now`` since the last call."""
        self._require_session()
        tau_now = self._tau(true_now)
        if tau_now < self._last_tau:
            raise ValueError(
                f"{self.name}: produce() went back in time ({true_now:.6f} is before the "
                "previous call)"
            )
        self._last_tau = tau_now
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        while True:
            taus, keys, second_complete = self._due_in_second(tau_now)
            if taus.size:
                pieces.append(self._store_samples(taus, keys))
            if not second_complete:
                break
            missing = self._rate - self._count_in_second
            if 0 < missing < FILLER_LIMIT:
                pieces.append(self._fillers(missing))
            self._second += 1
            self._count_in_second = 0
            self._next_index = self._first_index(self._second)

        if not pieces:
            channels = self._width()
            return np.zeros((0, channels), dtype="<f4")
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

    def _first_index(self, second: int) -> int:
        """First sample index belonging to RTC second ``second``."""
        if self._waveform:
            if second == 0:
                return 0
            assert self._decimation is not None
            ticks = (self._boundary(second) - _EDGE_S) * self._decimation.internal_rate
            return max(0, math.ceil(ticks / self._decimation.keep_every))
        return 0 if second >= 1 else 1

    def _due_in_second(self, tau_now: float) -> tuple[np.ndarray, np.ndarray, bool]:
        """(taus, noise keys) of accepted samples of the current second that are due, and
        whether the second's closing RTC interrupt is due too."""
        second = self._second
        rtc_closes = self.rtc and self._boundary(second + 1) <= tau_now + _EDGE_S
        if self._waveform:
            dec = self._decimation
            assert dec is not None
            step = dec.keep_every / dec.internal_rate
            first = self._first_index(second)
            if self.rtc:
                limit = min(self._first_index(second + 1), first + self._rate)
            else:
                limit = self._rate
            due_last = math.floor((tau_now + _EDGE_S) / step)
            stop = min(limit, due_last + 1)
            if stop <= self._next_index:
                return np.zeros(0), np.zeros(0, dtype=np.int64), rtc_closes
            index = np.arange(self._next_index, stop, dtype=np.int64)
            self._count_in_second += stop - self._next_index
            self._next_index = stop
            return index * step, index, rtc_closes

        # Latched: timer period in whole microseconds (§4.11).
        period = (1_000_000 // self._rate) * 1e-6
        if self.rtc and second >= 1:
            origin = self._boundary(second)
            limit = self._rate - 1
        else:
            origin = 0.0
            limit = self._rate if self.rtc else 2**62
            if self.rtc:
                # Before the first RTC interrupt the timer runs from the start.
                limit = min(limit, math.ceil((self._boundary(1) - _EDGE_S) / period) - 1)
        due_last = math.floor((tau_now + _EDGE_S - origin) / period)
        stop = min(limit, due_last) + 1
        if stop <= self._next_index:
            return np.zeros(0), np.zeros(0, dtype=np.int64), rtc_closes
        index = np.arange(self._next_index, stop, dtype=np.int64)
        self._count_in_second += stop - self._next_index
        self._next_index = stop
        return origin + index * period, second * 1_000_003 + index, rtc_closes

    # -- values

    def _measure(self, taus: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full-width (n, 6) float32 register values and their true instants."""
        if self._waveform:
            return self._waveform_rows(keys)
        t_true = self._true_times(taus)
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
        """Rows for ADE sample indices ``keys`` (ascending), served from look-ahead blocks.

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
            dec = self._decimation
            assert dec is not None
            index = np.arange(number * self._block_size, (number + 1) * self._block_size,
                              dtype=np.int64)
            times = self._true_times(index * (dec.keep_every / dec.internal_rate))
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

    def _store_samples(self, taus: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        full, t_true = self._measure(taus, keys)
        self._last_values = full[-1].copy()
        self._last_values_true = float(t_true[-1])
        order, kinds, dropped = self._apply_corrections(full.shape[0])
        if dropped.size:
            self._dropped.extend(t_true[dropped].tolist())
        rows = full[order][:, self._columns_of_rows()]
        return np.ascontiguousarray(rows), t_true[order], kinds

    def _fillers(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = self._width()
        # data[0..]: the first channels of the firmware's value array (§4.10).
        rows = np.repeat(self._last_values[None, :width], count, axis=0)
        measured = self._last_values_true
        times = np.full(count, measured if measured >= self.start_true else math.nan)
        return rows, times, np.full(count, KIND_FILLER, dtype=np.uint8)

    def _apply_corrections(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row order (with duplicates/omissions), kinds, and dropped positions (§6.5)."""
        if self._pending == 0 or self._rate == 1:
            self._total += n
            return np.arange(n), np.zeros(n, dtype=np.uint8), np.zeros(0, dtype=np.int64)
        order: list[np.ndarray] = []
        kinds: list[np.ndarray] = []
        dropped: list[int] = []
        i = 0
        while i < n:
            if self._pending == 0:
                order.append(np.arange(i, n))
                kinds.append(np.zeros(n - i, dtype=np.uint8))
                self._total += n - i
                break
            j = i + (1 - self._total) % self._rate  # next sample stored with count % rate == 1
            if j >= n:
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
        channels = self._width()
        values = (
            np.concatenate(self._truth_values)
            if self._truth_values
            else np.zeros((0, channels), dtype="<f4")
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
            true_times=np.concatenate(self._truth_times) if self._truth_times else np.zeros(0),
            kinds=(
                np.concatenate(self._truth_kinds)
                if self._truth_kinds
                else np.zeros(0, dtype=np.uint8)
            ),
            dropped_true_times=np.array(self._dropped),
            decimation=self._decimation,
            rtc=self.rtc,
            circuit=self.circuit,
        )


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
