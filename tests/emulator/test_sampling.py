"""The sampling engine (§4.3, §4.10, §4.11, §6.5) and the ring buffer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smartmeter_ophyd.emulator._clock import MeterClock
from smartmeter_ophyd.emulator._grid import GridModel
from smartmeter_ophyd.emulator._sampling import (
    KIND_FILLER,
    KIND_SAMPLE,
    RingBuffer,
    SamplingEngine,
)
from smartmeter_ophyd.protocol import ACCEPTED_RATES, RING_BUFFER_BYTES, Measures, decimation

T0 = 1_750_000_000.0
GRID = GridModel(seed=11)


def _engine(offset_s: float = 0.0, drift_ppm: float = 0.0, *, circuit: int = 0,
            noise_seed: int = 1, rtc: bool = True, keep_truth: bool = True,
            ade_drift_ppm: float = 0.0, rtc_drift_ppm: float = 0.0) -> SamplingEngine:
    clock = MeterClock(offset_s, drift_ppm, anchor_true=T0, true_time=lambda: T0)
    return SamplingEngine(GRID, clock, circuit=circuit, noise_seed=noise_seed, rtc=rtc,
                          keep_truth=keep_truth, name="lab-1", ade_drift_ppm=ade_drift_ppm,
                          rtc_drift_ppm=rtc_drift_ppm)


def _run(engine: SamplingEngine, start: float, seconds: float, step: float = 0.04) -> np.ndarray:
    rows = []
    t = start
    while t < start + seconds:
        t = min(t + step, start + seconds)
        rows.append(engine.produce(t))
    return np.concatenate(rows)


def _seconds(engine: SamplingEngine) -> list[np.ndarray]:
    """Offsets from the start of the sampled (non-filler) rows of each RTC second; the
    first is the partial second from the start to the first RTC interrupt."""
    truth = engine.truth()
    u = truth.true_times[truth.kinds != KIND_FILLER] - truth.true_start
    edges = truth.rtc_edges - truth.true_start
    return np.split(u, np.searchsorted(u, edges - 5e-7))


# ------------------------------------------------------------------------- rates (§4.3)


@pytest.mark.parametrize("rate", ACCEPTED_RATES)
def test_every_full_rtc_second_holds_rate_samples(rate: int) -> None:
    engine = _engine(offset_s=0.0137, drift_ppm=0.0)
    start = T0 + 0.402
    engine.start(Measures.VI, rate, at_true=start)
    _run(engine, start, 3.7, step=0.05)
    truth = engine.truth()
    # The RTC was reset at the start: its seconds begin 0.5 s, 1.5 s, ... after it.
    edges = truth.rtc_edges - start
    assert np.allclose(edges, [0.5, 1.5, 2.5, 3.5], atol=1e-6)
    seconds = _seconds(engine)
    assert len(seconds) == 5
    assert seconds[0][0] == pytest.approx(0.0, abs=1e-6) and seconds[0].shape[0] <= rate
    dec = decimation(rate)
    step = 1 / dec.decimated_rate
    for u, edge in zip(seconds[1:4], edges[:3], strict=True):
        assert u.shape[0] == rate
        # Every k-th ADE sample from the RTC edge on; bursty rates then pause.
        assert 0 <= u[0] - edge < step + 1e-6
        assert np.allclose(np.diff(u), step, atol=1e-6)
        span = 1 - 1 / rate if dec.uniform else (rate - 1) * step
        assert u[-1] - u[0] == pytest.approx(span, abs=2e-6)
    assert not np.any(truth.kinds == KIND_FILLER)
    assert truth.rtc_drops.shape[0] == 0


def test_burst_timing_rate_1_and_6400() -> None:
    for rate, lattice in ((1, 1 / 125), (6400, 1 / 8000)):
        engine = _engine()
        engine.start(Measures.VI_L1, rate, at_true=T0 + 0.25)
        _run(engine, T0 + 0.25, 3.0)
        seconds = _seconds(engine)
        for u, edge in zip(seconds[1:3], (0.5, 1.5), strict=True):
            assert u.shape[0] == rate
            assert 0 <= u[0] - edge < lattice  # at the start of the RTC second
            assert u[-1] - u[0] == pytest.approx((rate - 1) * lattice, abs=1e-6)


@pytest.mark.parametrize("measures", [Measures.PQ, Measures.VI_RMS])
@pytest.mark.parametrize("rate", [1, 3, 7, 50])
def test_latched_rates_hold_rate_readings_per_second(measures: Measures, rate: int) -> None:
    engine = _engine(offset_s=-0.21)
    start = T0 + 0.33
    engine.start(measures, rate, at_true=start)
    values = _run(engine, start, 3.6, step=0.1)
    seconds = _seconds(engine)
    period = (1_000_000 // rate) * 1e-6
    # Before the first RTC interrupt the timer runs from the start (first tick after one
    # period, at most `rate` readings, none at or after the interrupt at 0.5 s).
    assert np.allclose(seconds[0], period * np.arange(1, seconds[0].shape[0] + 1), atol=1e-6)
    assert seconds[0].shape[0] == min(rate, math.ceil(0.5 / period - 1e-9) - 1)
    for u, edge in zip(seconds[1:4], (0.5, 1.5, 2.5), strict=True):
        # Re-aligned to the RTC second, then every 1e6 // rate microseconds (§4.11).
        assert u.shape[0] == rate
        assert u[0] == pytest.approx(edge, abs=1e-6)
        assert np.allclose(np.diff(u), period, atol=1e-6)
    assert values.shape[1] == 6
    truth = engine.truth()
    sampled = values[truth.kinds == KIND_SAMPLE]
    snap = GRID.snapshot_arrays(truth.true_times[truth.kinds == KIND_SAMPLE], 0)
    if measures is Measures.PQ:
        expected = np.concatenate([snap["active_power"], snap["reactive_power"]], axis=1)
        assert np.allclose(sampled, expected, atol=3.0)
    else:
        expected = np.concatenate([snap["voltage_rms"], snap["current_rms"]], axis=1)
        assert np.allclose(sampled, expected, atol=3.0)
        assert np.all(np.abs(sampled[:, :3] - 230) < 5)


def test_latched_timer_runs_on_the_esp_clock() -> None:
    # §4.11: the hardware timer counts the ESP's 80 MHz: 1000 ppm fast means 1000 ppm
    # shorter periods in true time; the RTC edges do not care.
    engine = _engine(drift_ppm=1000.0)
    engine.start(Measures.PQ, 50, at_true=T0)
    _run(engine, T0, 2.6)
    u = _seconds(engine)[2]
    assert u[0] == pytest.approx(1.5, abs=1e-6)
    assert np.allclose(np.diff(u), 0.02 / 1.001, atol=1e-7)


def test_latched_rate_above_50_is_refused() -> None:
    engine = _engine()
    with pytest.raises(ValueError, match="lab-1.*50"):
        engine.start(Measures.PQ, 64, at_true=T0)


def test_non_divisor_rate_is_refused_with_the_meter_name() -> None:
    engine = _engine()
    with pytest.raises(ValueError, match="lab-1.*32000"):
        engine.start(Measures.VI, 3000, at_true=T0)


def test_implausible_crystal_errors_are_refused() -> None:
    with pytest.raises(ValueError, match="lab-1.*ade_drift_ppm"):
        _engine(ade_drift_ppm=2e5)
    with pytest.raises(ValueError, match="lab-1.*rtc_drift_ppm"):
        _engine(rtc_drift_ppm=-1e6)


# ------------------------------------------------------------------------- RTC (§4.10)


def test_without_rtc_a_waveform_session_stops_after_rate_samples() -> None:
    engine = _engine(rtc=False)
    engine.start(Measures.VI, 400, at_true=T0 + 0.25)
    values = _run(engine, T0 + 0.25, 4.0)
    assert values.shape == (400, 6)
    assert engine.produce(T0 + 10.0).shape == (0, 6)
    assert engine.samples_produced == 400
    truth = engine.truth()
    assert truth.rtc_edges.shape[0] == truth.rtc_resets.shape[0] == truth.rtc_drops.shape[0] == 0


def test_without_rtc_a_latched_session_keeps_its_timer() -> None:
    engine = _engine(rtc=False)
    engine.start(Measures.PQ, 10, at_true=T0 + 0.25)
    values = _run(engine, T0 + 0.25, 3.0)
    assert values.shape[0] == 30  # every 100 ms, no per-second limit, no fillers
    assert not np.any(engine.truth().kinds == KIND_FILLER)


def _lattice_count(lo: float, hi: float, step: float) -> int:
    """Kept-lattice samples at offsets in [lo, hi)."""
    return math.ceil(hi / step - 1e-9) - math.ceil(lo / step - 1e-9)


def test_rtc_fills_a_second_of_a_slow_ade() -> None:
    # The ADE 400 ppm slow: 7996.8 samples per RTC second; the interrupt closing each
    # second appends copies of the last sample for the 3 or 4 missing.
    rate, ppm = 8000, -400.0
    engine = _engine(ade_drift_ppm=ppm)
    engine.start(Measures.VI, rate, at_true=T0)
    values = _run(engine, T0, 3.6)
    truth = engine.truth()
    step = 1 / rate / (1 + ppm * 1e-6)
    fillers = truth.filler_indices
    expected_fill = [rate - _lattice_count(e, e + 1, step) for e in (0.5, 1.5, 2.5)]
    assert fillers.shape[0] == sum(expected_fill) and all(3 <= n <= 4 for n in expected_fill)
    sampled = np.flatnonzero(truth.kinds == KIND_SAMPLE)
    assert np.allclose(np.diff(truth.true_times[sampled] - T0), step, atol=5e-7)  # none lost
    for edge, count in zip(truth.rtc_edges[1:], expected_fill, strict=True):
        rows = np.flatnonzero((truth.kinds == KIND_FILLER) & (truth.true_times == edge))
        assert rows.shape[0] == count
        assert np.all(np.diff(rows) == 1)
        for r in rows:
            assert np.array_equal(values[r], values[rows[0] - 1])  # the last converted sample
        assert truth.true_times[rows[0] - 1] < edge <= truth.true_times[rows[-1] + 1]
    assert engine.samples_produced == truth.kinds.shape[0] - fillers.shape[0]
    assert truth.rtc_drops.shape[0] == 0
    assert truth.rtc_counts[1:].tolist() == [rate - n for n in expected_fill]
    assert engine.last_second_count == truth.rtc_counts[-1]


def test_rtc_refuses_the_excess_of_a_fast_ade() -> None:
    # The ADE 400 ppm fast: 8003.2 samples per RTC second; the last 3 or 4 of each second
    # are refused unread, and the truth lists their instants.
    rate, ppm = 8000, 400.0
    engine = _engine(ade_drift_ppm=ppm)
    engine.start(Measures.VI_L1, rate, at_true=T0)
    _run(engine, T0, 3.6)
    truth = engine.truth()
    step = 1 / rate / (1 + ppm * 1e-6)
    seconds = _seconds(engine)
    assert [u.shape[0] for u in seconds[1:4]] == [rate] * 3
    drops = truth.rtc_drops - T0
    expected = [_lattice_count(e, e + 1, step) - rate for e in (0.5, 1.5, 2.5)]
    assert drops.shape[0] == sum(expected) and all(3 <= n <= 4 for n in expected)
    for u, edge in zip(seconds[1:4], (0.5, 1.5, 2.5), strict=True):
        lost = drops[(drops >= edge) & (drops < edge + 1)]
        assert np.allclose(lost, u[-1] + step * np.arange(1, lost.shape[0] + 1), atol=5e-7)
    assert not np.any(truth.kinds == KIND_FILLER)


def test_rtc_drift_moves_the_seconds_not_the_samples() -> None:
    engine = _engine(rtc_drift_ppm=2.0)
    engine.start(Measures.VI, 1000, at_true=T0)
    _run(engine, T0, 3.0)
    truth = engine.truth()
    assert np.allclose(truth.rtc_edges - T0, (0.5 + np.arange(3)) / (1 + 2e-6), atol=1e-9)
    t = truth.true_times - T0
    assert np.allclose(t, np.arange(t.shape[0]) / 1000, atol=5e-7)


def test_an_rtc_write_restarts_the_seconds() -> None:
    # §6.2: a blocking NTP success writes the RTC; its seconds restart 0.5 s later.  Written
    # 0.8 s into a second, that second lasts 1.3 s: 8 kHz x 0.3 s are refused.
    engine = _engine()
    engine.start(Measures.VI_L1, 8000, at_true=T0)
    _run(engine, T0, 1.3)
    engine.reset_rtc(T0 + 1.3)
    _run(engine, T0 + 1.3, 0.7)
    truth = engine.truth()
    assert np.allclose(truth.rtc_edges - T0, [0.5, 1.8], atol=1e-6)
    assert np.allclose(truth.rtc_resets - T0, [0.0, 1.3])
    seconds = _seconds(engine)
    assert seconds[1].shape[0] == 8000
    assert seconds[1][-1] == pytest.approx(0.5 + 7999 / 8000, abs=1e-6)
    assert seconds[2][0] == pytest.approx(1.8, abs=1e-6)
    drops = truth.rtc_drops - T0
    assert drops.shape[0] == 2400 and drops[0] == pytest.approx(1.5, abs=1e-6)
    # Written 0.2 s into the next second: it lasts 0.7 s, nothing is refused or filled.
    engine.reset_rtc(T0 + 2.0)
    _run(engine, T0 + 2.0, 1.6)
    truth = engine.truth()
    assert np.allclose(truth.rtc_edges - T0, [0.5, 1.8, 2.5, 3.5], atol=1e-6)
    assert truth.rtc_drops.shape[0] == 2400 and truth.filler_indices.shape[0] == 0
    assert [u.shape[0] for u in _seconds(engine)[1:4]] == [8000, 5600, 8000]


def test_rtc_fillers_copy_l1_values_in_l2_mode() -> None:
    rate, ppm = 4000, -600.0  # 3997.6 per RTC second: 2 or 3 fillers
    full = _engine(noise_seed=5, ade_drift_ppm=ppm)
    full.start(Measures.VI, rate, at_true=T0)
    l2 = _engine(noise_seed=5, ade_drift_ppm=ppm)
    l2.start(Measures.VI_L2, rate, at_true=T0)
    values_full = _run(full, T0, 1.6)
    values_l2 = _run(l2, T0, 1.6)
    truth = l2.truth()
    filler = int(truth.filler_indices[0])
    assert np.array_equal(values_l2[:filler], values_full[:filler, 2:4])
    # The firmware copies data[0..1]: v_l1, i_l1 of the last sample (§4.10).
    assert np.array_equal(values_l2[filler], values_full[filler - 1, 0:2])


def test_latched_rate_1_first_second_filler_is_stale_data() -> None:
    engine = _engine()
    engine.start(Measures.VI_RMS, 1, at_true=T0 + 0.5)
    values = _run(engine, T0 + 0.5, 1.2)
    truth = engine.truth()
    assert truth.kinds.tolist() == [KIND_FILLER, KIND_SAMPLE]
    assert np.array_equal(values[0], np.zeros(6, dtype=np.float32))  # boot-time data[]
    # The filler's instant is the RTC interrupt that appended it; the reading follows it.
    assert truth.true_times.tolist() == [T0 + 1.0, T0 + 1.0]


# ----------------------------------------------------------------- NTP corrections (§6.5)


def test_positive_correction_duplicates_about_once_per_second() -> None:
    rate = 1000
    engine = _engine()
    engine.start(Measures.VI, rate, at_true=T0)
    _run(engine, T0, 1.0)
    engine.queue_correction(3)
    _run(engine, T0 + 1.0, 4.0)
    truth = engine.truth()
    duplicates = truth.correction_duplicates
    assert duplicates.shape[0] == 3
    assert np.all(np.diff(duplicates) == rate)  # count % rate == 1 once per second
    for d in duplicates:
        assert np.array_equal(truth.values[d], truth.values[d - 1])
        assert truth.true_times[d] == truth.true_times[d - 1]
    assert engine.samples_produced == 5 * rate + 1 + 3  # samples at 0 s ... 5 s inclusive
    assert engine.pending_correction == 0


def test_negative_correction_drops_consecutively() -> None:
    rate = 500
    engine = _engine()
    engine.start(Measures.VI_L3, rate, at_true=T0)
    _run(engine, T0, 1.5)
    engine.queue_correction(-4)
    _run(engine, T0 + 1.5, 2.0)
    truth = engine.truth()
    dropped = truth.correction_drops
    assert dropped.shape[0] == 4
    assert np.allclose(np.diff(dropped), 1 / rate, atol=1e-6)
    assert engine.samples_produced == int(3.5 * rate) + 1 - 4
    assert truth.values.shape[0] == engine.samples_produced
    kept = truth.true_times
    assert not np.any(np.isin(kept, dropped))


def test_corrections_are_capped_and_never_apply_at_rate_1() -> None:
    engine = _engine()
    engine.start(Measures.VI, 2000, at_true=T0)
    engine.queue_correction(25)
    assert engine.pending_correction == 10
    engine.queue_correction(-100)
    assert engine.pending_correction == 0
    one = _engine()
    one.start(Measures.VI, 1, at_true=T0)
    one.queue_correction(5)
    _run(one, T0, 4.0)
    assert one.samples_produced == 5 and one.pending_correction == 5  # count % 1 is never 1


# -------------------------------------------------------------------- rate marks (§4.7)


def test_rate_marks_every_rate_accepted_samples() -> None:
    engine = _engine(ade_drift_ppm=100.0)
    engine.start(Measures.VI, 2000, at_true=T0)
    assert engine.rate_mark == (T0, T0) and engine.rate_marks == 0
    _run(engine, T0, 2.3, step=0.3)
    step = 1 / 2000 / (1 + 100e-6)
    t = engine.truth().true_times
    assert engine.rate_marks == 2
    assert engine.rate_mark == (pytest.approx(t[1999]), pytest.approx(t[3999]))
    assert engine.rate_mark[1] - engine.rate_mark[0] == pytest.approx(2000 * step, abs=5e-7)


def test_latched_rate_marks_once_per_rtc_second() -> None:
    engine = _engine()
    engine.start(Measures.PQ, 10, at_true=T0)
    _run(engine, T0, 2.5)
    # 4 readings before 0.5 s; then 10 per second from 0.5 s and 1.5 s: marks at the 10th.
    assert engine.rate_marks == 2
    assert engine.rate_mark == (pytest.approx(T0 + 1.4), pytest.approx(T0 + 2.4))


# ---------------------------------------------------------------------- clocks and truth


def test_ade_drift_makes_the_true_rate_off_by_the_ppm() -> None:
    ppm = 250.0
    engine = _engine(ade_drift_ppm=ppm, drift_ppm=-80.0, keep_truth=True)
    engine.start(Measures.VI_L1, 8000, at_true=T0)
    _run(engine, T0, 4.0, step=0.25)
    truth = engine.truth()
    u = _seconds(engine)[2]  # one full RTC second: contiguous kept samples
    assert u.shape[0] == 8000
    true_step = np.polyfit(np.arange(u.shape[0]), u, 1)[0]
    assert 1 / true_step == pytest.approx(8000 * (1 + ppm * 1e-6), rel=2e-7)
    assert truth.ade_drift_ppm == ppm and truth.drift_ppm == -80.0
    # The software clock's drift does not touch the samples; the RTC refuses the excess
    # (8002 a second, 2 refused).
    assert truth.rtc_drops.shape[0] == 6


def _cross_correlation_lag(a: np.ndarray, b: np.ndarray) -> float:
    """Lag k (in samples, parabolic refinement) with ``b[n] ~ a[n + k]``."""
    a = a - a.mean()
    b = b - b.mean()
    n = a.shape[0]
    size = 1 << (2 * n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    corr = np.concatenate([corr[-(n - 1):], corr[:n]])
    lags = np.arange(-(n - 1), n)
    window = np.abs(lags) < 200
    i = int(np.flatnonzero(window)[np.argmax(corr[window])])
    y0, y1, y2 = corr[i - 1], corr[i], corr[i + 1]
    return float(lags[i] + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2))


@pytest.mark.parametrize(("rate", "tolerance_s"), [(8000, 1 / 8000), (32000, 1e-4)])
def test_two_meters_record_the_same_wave_shifted_by_their_timing_error(
    rate: int, tolerance_s: float
) -> None:
    # Both meters start when their own clock reads the same second (a scheduled start):
    # one runs 3 ms ahead, the other 2.3 ms behind, so their records differ by 5.3 ms.
    meter_start = T0 + 2.0
    fast, slow = _engine(offset_s=0.003, noise_seed=1), _engine(offset_s=-0.0023, noise_seed=2)
    records = []
    for engine in (fast, slow):
        start_true = engine.clock.true_time_of(meter_start)
        engine.start(Measures.VI, rate, at_true=start_true)
        records.append(_run(engine, start_true, 0.5, step=0.1))
        assert engine.start_meter_ts == pytest.approx(meter_start, abs=1e-9)
    lag = _cross_correlation_lag(records[0][:, 0].astype(float), records[1][:, 0].astype(float))
    assert lag / rate == pytest.approx(0.0053, abs=tolerance_s)


def test_same_instants_give_the_same_voltage_on_every_meter() -> None:
    a = _engine(noise_seed=1, circuit=0)
    b = _engine(noise_seed=2, circuit=3)
    for engine in (a, b):
        engine.start(Measures.VI, 4000, at_true=T0 + 0.1)
        _run(engine, T0 + 0.1, 0.5)
    va, vb = a.truth().values, b.truth().values
    assert np.allclose(va[:, 0::2], vb[:, 0::2], atol=1.0)  # same grid voltage ...
    assert not np.array_equal(va[:, 0::2], vb[:, 0::2])  # ... with each meter's own noise
    assert not np.allclose(va[:, 1::2], vb[:, 1::2], atol=100)  # different circuits


def test_deterministic_and_independent_of_call_pattern() -> None:
    def record(step: float, noise_seed: int = 9) -> np.ndarray:
        engine = _engine(offset_s=0.0042, drift_ppm=31.0, noise_seed=noise_seed,
                         ade_drift_ppm=-17.0)
        engine.start(Measures.VI, 8000, at_true=T0 + 0.77)
        _run(engine, T0 + 0.77, 1.3, step=step)
        return engine.truth().values

    reference = record(0.04)
    # 1.3 s of an ADE 17 ppm slow: 1.2999779 ADE seconds -> samples 0..10399.
    assert reference.dtype == np.dtype("<f4") and reference.shape == (10400, 6)
    assert np.array_equal(record(0.013), reference)
    assert np.array_equal(record(0.5), reference)
    assert not np.array_equal(record(0.04, noise_seed=10), reference)


def test_truth_is_exactly_what_produce_returned() -> None:
    engine = _engine(offset_s=0.5, drift_ppm=3.0)
    engine.start(Measures.VI_L1, 2000, at_true=T0 + 0.3)
    returned = _run(engine, T0 + 0.3, 2.0, step=0.07)
    truth = engine.truth()
    assert truth.values.tobytes() == returned.tobytes()
    assert truth.samples_produced == engine.samples_produced == returned.shape[0]
    assert truth.meter_start_ts == engine.start_meter_ts == pytest.approx(T0 + 0.8, abs=1e-6)
    assert truth.true_start == engine.start_true == T0 + 0.3
    assert truth.clock_offset_s == pytest.approx(0.5, abs=1e-5)
    assert truth.drift_ppm == 3.0 and truth.rate == 2000 and truth.measures is Measures.VI_L1
    assert truth.true_times.shape == (returned.shape[0],)
    assert np.all(np.diff(truth.true_times) > 0)


def test_waveform_values_match_the_grid_in_firmware_units() -> None:
    engine = _engine(circuit=2)
    engine.start(Measures.VI, 8000, at_true=T0 + 0.2)
    values = _run(engine, T0 + 0.2, 0.3)
    truth = engine.truth()
    expected = GRID.interleaved(truth.true_times, 2)
    error = values.astype(np.float64) - expected
    assert np.all(np.abs(error[:, 0::2]) < 0.5)  # V: noise sigma 0.05 V
    assert np.all(np.abs(error[:, 1::2]) < 15)  # mA: noise sigma 1.5 mA
    assert 0.02 < np.std(error[:, 0]) < 0.1
    assert Measures.VI.units == ("V", "mA", "V", "mA", "V", "mA")


def test_force_waveform_streams_raw_vi_under_latched_labels() -> None:
    engine = _engine()
    engine.start(Measures.PQ, 10, decimation_rate=4000, at_true=T0 + 0.5, force_waveform=True)
    values = _run(engine, T0 + 0.5, 2.6)
    assert values.shape[1] == 6
    assert np.max(np.abs(values[:, 0])) > 100  # instantaneous volts, not watts
    assert [u.shape[0] for u in _seconds(engine)[:3]] == [10, 10, 10]
    assert engine.truth().rtc_drops.shape[0] == 0  # refusing 3990 a second is the design


def test_auto_stream_inherits_decimation() -> None:
    # §7.1: 8000 Hz requested, k from a previous 4000 Hz command -> 4000 Hz really.
    engine = _engine()
    engine.start(Measures.VI, 8000, decimation_rate=4000, at_true=T0)
    values = _run(engine, T0, 2.0)
    assert values.shape[0] == 8000 + 1


def test_usage_errors_name_the_meter() -> None:
    engine = _engine()
    with pytest.raises(RuntimeError, match="lab-1"):
        engine.produce(T0)
    with pytest.raises(RuntimeError, match="lab-1"):
        engine.truth()
    engine.start(Measures.VI, 8000, at_true=T0)
    engine.produce(T0 + 1)
    with pytest.raises(ValueError, match="lab-1.*back in time"):
        engine.produce(T0 + 0.5)
    quiet = _engine(keep_truth=False)
    quiet.start(Measures.VI, 8000, at_true=T0)
    assert quiet.produce(T0 + 0.1).shape == (801, 6)
    with pytest.raises(RuntimeError, match="keep_truth"):
        quiet.truth()


# ----------------------------------------------------------------------------- ring buffer


def test_ring_buffer_is_a_byte_fifo() -> None:
    ring = RingBuffer()
    assert ring.capacity == RING_BUFFER_BYTES == 3_670_016
    assert ring.write(b"abc") and ring.write(bytearray(b"defg"))
    assert ring.readable == 7
    assert ring.peek(2) == b"ab"
    assert ring.read(4) == b"abcd"
    assert ring.read(10) == b"efg"
    assert ring.readable == 0 and ring.read(5) == b""
    assert ring.write(b"xyz")
    ring.clear()
    assert ring.readable == 0 and ring.read_all() == b""


def test_ring_buffer_overflow_refuses_without_storing() -> None:
    ring = RingBuffer(capacity=2400)
    chunk = bytes(range(240)) * 4  # 960 bytes
    assert ring.write(chunk) and ring.write(chunk)
    assert not ring.write(chunk)  # would need 2880 bytes
    assert ring.readable == 1920
    assert ring.write(chunk[:480])  # exactly full
    assert ring.free == 0 and not ring.write(b"x")
    assert ring.read_all() == chunk + chunk + chunk[:480]


def test_ring_buffer_streams_8khz_for_a_minute_in_order() -> None:
    # 60 s of 8 kHz x 6 float32 in 1008-byte chunks, read as the firmware writes them:
    # whole chunks only while more than one is buffered (§4.5).
    ring = RingBuffer()
    payload = np.arange(8000 * 6 * 60, dtype="<f4").tobytes()
    out = bytearray()
    for offset in range(0, len(payload), 4800):  # 25 ms of data per write
        assert ring.write(payload[offset:offset + 4800])
        while ring.readable > 1008:
            out += ring.read(1008)
    out += ring.read_all()
    assert bytes(out) == payload
    assert ring.bytes_written == len(payload)
