"""Post-hoc alignment against the ground truth of simulated meters on the grid model."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from smartmeter_ophyd.emulator._grid import GridModel
from smartmeter_ophyd.timing import (
    Aligner,
    Alignment,
    AlignmentError,
    Waveform,
    align,
    align_pair,
    apply_alignment,
)

from ._signals import LSB_V, NOISE_V, T0, SimMeter, simulate, true_offset

RESIDUAL_LIMIT_S = 10e-6


def wave(m: SimMeter) -> Waveform:
    return Waveform(m.name, m.time, m.voltage)


def window_truth(a: Alignment, meter: SimMeter, reference: SimMeter) -> np.ndarray:
    """True offset at each piece's midpoint (interpolated between the meter's samples)."""
    mid = 0.5 * (a.window_start + a.window_end) - T0
    return np.interp(mid, meter.rel_time, true_offset(meter, reference))


def sample_residual(a: Alignment, meter: SimMeter, reference: SimMeter) -> np.ndarray:
    """Per meter sample: aligned stamp minus the reference's stamp for the same instant."""
    aligned = apply_alignment(meter.time, a) - T0
    return aligned - reference.recorded_rel(meter.true_rel)


@pytest.fixture(scope="module")
def three_meters() -> tuple[dict[str, SimMeter], dict[str, Alignment]]:
    meters = {
        "a": simulate("a", offset_s=-1.2e-3, drift_ppm=-50.0, start_rel=0.0104, seed=1,
                      duration_s=40.0),
        "b": simulate("b", offset_s=0.0, drift_ppm=0.0, start_rel=0.0, seed=2,
                      duration_s=40.0),
        "c": simulate("c", offset_s=1.7e-3, drift_ppm=50.0, start_rel=0.0231, seed=3,
                      duration_s=40.0),
    }
    return meters, align([wave(m) for m in meters.values()], "b")


def with_stored_jumps(m: SimMeter, jumps: tuple[tuple[float, float], ...], seed: int) -> SimMeter:
    """The meter with its stored-time error jumping by ``size`` at stored time ``at`` (s
    after T0) for each ``(at, size)``, as the time model's RTC restarts and refused samples
    do: the stamps stay, the true instants (and so the values) move by ``-size``."""
    true_rel = m.true_rel.copy()
    for at, size in jumps:
        true_rel[m.rel_time >= at] -= size
    volts = GridModel(seed=7).voltage(T0 + true_rel)[:, 0]
    rng = np.random.default_rng(seed)
    noise = (rng.random(volts.size) + rng.random(volts.size) - 1.0) * NOISE_V * math.sqrt(6.0)
    values = (np.rint((volts + noise) / LSB_V) * LSB_V).astype(np.float32)
    return replace(m, true_rel=true_rel, voltage=values)


def offset_truth(m: SimMeter, reference: SimMeter, rel: np.ndarray) -> np.ndarray:
    """True offset at meter stamps ``rel`` (s after T0; held beyond the meter's samples):
    each sample's stamp minus the reference's stamp of the same instant, read off the
    reference's own samples (its jumps included)."""
    per_sample = m.rel_time - np.interp(m.true_rel, reference.true_rel, reference.rel_time)
    return np.interp(rel, m.rel_time, per_sample)


def check_against_truth(a: Alignment, m: SimMeter, reference: SimMeter) -> np.ndarray:
    """Every window and every sample with an offset within 10 us of the truth, every window
    covered by its uncertainty; returns the samples' residuals (NaN where no offset)."""
    mid = 0.5 * (a.window_start + a.window_end) - T0
    error = a.offset_s - offset_truth(m, reference, mid)
    assert np.abs(error).max() <= RESIDUAL_LIMIT_S
    assert np.all(np.abs(error) <= a.uncertainty_s)
    covered = (m.true_rel > reference.true_rel[0]) & (m.true_rel < reference.true_rel[-1])
    residual = apply_alignment(m.time, a) - T0 - (
        m.rel_time - offset_truth(m, reference, m.rel_time))
    residual[~covered] = np.nan
    assert np.nanmax(np.abs(residual)) <= RESIDUAL_LIMIT_S
    return residual


def test_three_meters_at_8khz_meet_10us_and_coverage(three_meters) -> None:
    meters, result = three_meters
    ref = meters["b"]
    assert set(result) == {"a", "c"}
    # Raw misalignment above 1 ms between every pair, through the whole run.
    raw = {name: np.abs(true_offset(m, ref)) for name, m in meters.items() if name != "b"}
    assert min(float(r.min()) for r in raw.values()) > 1e-3
    assert float(np.abs(true_offset(meters["a"], meters["c"])).min()) > 1e-3
    covered = []
    for name in ("a", "c"):
        a = result[name]
        assert a.meter == name and a.reference == "b"
        assert len(a) >= 39, a.notes
        error = a.offset_s - window_truth(a, meters[name], ref)
        assert np.abs(error).max() <= RESIDUAL_LIMIT_S
        covered.extend(np.abs(error) <= a.uncertainty_s)
        # Every sample of every window, read back through the helper.
        residual = sample_residual(a, meters[name], ref)
        assert np.abs(residual).max() <= RESIDUAL_LIMIT_S
        # Drift of +-50 ppm against the reference is followed inside each window.
        assert np.median(a.drift) == pytest.approx(meters[name].drift_ppm * 1e-6, abs=2e-7)
        assert a.correlation.min() > 0.99999
        assert a.n_samples.sum() > 0.97 * meters[name].voltage.size
        assert np.all(np.isfinite(a.uncertainty_s)) and np.all(a.uncertainty_s > 0)
        assert len(a.breaks) == 0, a.breaks - T0  # nothing to break on in clean data
    assert np.mean(covered) >= 0.95


def test_one_meter_at_a_time_equals_all_at_once(three_meters) -> None:
    """``Aligner`` (what a run's alignment stream uses, so that memory holds two meters, not
    all) gives exactly ``align``'s result; a meter outside its span is refused by name."""
    meters, result = three_meters
    span = (min(float(m.time[0]) for m in meters.values()),
            max(float(m.time[-1]) for m in meters.values()))
    aligner = Aligner(wave(meters["b"]), span)
    for name in ("a", "c"):
        alone = aligner(wave(meters[name]))
        for field in ("window_start", "window_end", "offset_s", "drift", "uncertainty_s",
                      "correlation", "n_samples", "breaks", "break_step_s"):
            assert np.array_equal(getattr(alone, field), getattr(result[name], field)), field
    late = simulate("late", offset_s=0.0, drift_ppm=0.0, start_rel=45.0, seed=4, duration_s=2.0)
    with pytest.raises(AlignmentError, match="'late'.*outside the span"):
        aligner(wave(late))


def test_coverage_is_honest_when_noise_dominates() -> None:
    """With noisy meters the uncertainty is set by the scatter, and still covers."""
    ref = simulate("ref", offset_s=0.0, drift_ppm=20.0, seed=11, noise_v=8.0, duration_s=60)
    m = simulate("m", offset_s=2.3e-3, drift_ppm=-40.0, start_rel=0.0057, seed=12,
                 noise_v=8.0, duration_s=60)
    a = align_pair(wave(m), wave(ref))
    error = a.offset_s - window_truth(a, m, ref)
    assert np.median(a.uncertainty_s) > 5 * np.median(0.5 * np.spacing(a.window_end))
    assert np.mean(np.abs(error) <= a.uncertainty_s) >= 0.95
    assert np.abs(error).max() <= RESIDUAL_LIMIT_S


@pytest.mark.parametrize(("kind", "n", "sign"), [("dup", 1, 1), ("drop", 3, -1)])
def test_duplicated_or_dropped_samples_become_located_steps(kind: str, n: int, sign: int) -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=-20.0, seed=21, duration_s=12)
    m = simulate("m", offset_s=1.3e-3, drift_ppm=45.0, start_rel=0.0123, seed=22,
                 duration_s=12, edits=((kind, 5.537, n),))
    a = align_pair(wave(m), wave(ref))
    steps = np.isfinite(a.break_step_s)
    assert np.count_nonzero(steps) == 1
    assert a.break_step_s[steps][0] == pytest.approx(sign * n / 8000, abs=1e-6)
    truth = true_offset(m, ref)
    jump = int(np.flatnonzero(np.abs(np.diff(truth)) > 50e-6)[0]) + 1
    lo, hi = a.breaks[steps][0] - T0
    assert m.rel_time[jump - 1] <= hi and lo <= m.rel_time[jump]  # within one sample
    residual = sample_residual(a, m, ref)
    assert np.abs(residual).max() <= RESIDUAL_LIMIT_S
    error = a.offset_s - window_truth(a, m, ref)
    assert np.abs(error).max() <= RESIDUAL_LIMIT_S
    assert np.all(np.abs(error) <= a.uncertainty_s)


# Stored-time jumps of arbitrary size (not whole samples) at 0.45 s and 0.4 s from the ends:
# fewer than five blocks (and at 18 ms, no whole block) on the short side.
@pytest.mark.parametrize("jumps", [
    ((0.03, 70e-6), (3.97, -117e-6)),
    ((0.26, -40e-6), (3.88, 31e-6)),
    ((0.45, 9e-6), (3.75, -63e-6)),
])
def test_non_sample_steps_next_to_both_ends_are_located(jumps) -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=-20.0, seed=81, duration_s=4)
    m = with_stored_jumps(simulate("m", offset_s=1.1e-3, drift_ppm=30.0, start_rel=0.0123,
                                   seed=82, duration_s=4), jumps, seed=82)
    a = align_pair(wave(m), wave(ref))
    steps = np.isfinite(a.break_step_s)
    assert np.count_nonzero(steps) == len(jumps), (a.breaks - T0, a.break_step_s)
    for (at, size), (lo, hi), found in zip(jumps, a.breaks[steps] - T0,
                                           a.break_step_s[steps], strict=True):
        assert lo < at + 1e-9 and at - 1e-9 < hi and hi - lo < 1.5 / 8000  # the sample pair
        assert found == pytest.approx(size, abs=1e-6)
    residual = check_against_truth(a, m, ref)
    # Only the stretches too short for a piece (under min_blocks blocks) have no offset.
    assert np.count_nonzero(np.isnan(residual)) < 0.15 * residual.size


def test_jumps_at_the_same_stamp_in_both_meters_bound_an_excursion() -> None:
    """Alike crystals, seconds started together: both stored times jump at the same stamp.
    For the meter's offset (1 ms) after it, one meter has jumped and the other not: the
    offset jumps and jumps back.  Blocks on the stamps shift alike and cannot see it; the
    window midpoints (x.5 s) land inside it."""
    jumps = ((0.4995, 62.5e-6), (2.4998, 30e-6), (4.4999, -125e-6))
    ref = with_stored_jumps(simulate("ref", offset_s=0.0, drift_ppm=30.0, seed=91,
                                     duration_s=5.3), jumps, seed=91)
    m = with_stored_jumps(simulate("m", offset_s=1.0e-3, drift_ppm=30.0, seed=92,
                                   duration_s=5.3), jumps, seed=92)
    a = align_pair(wave(m), wave(ref))
    assert np.count_nonzero(np.isfinite(a.break_step_s)) == 2 * len(jumps)
    pairs = a.breaks.reshape(len(jumps), 2, 2) - T0
    for (at, size), edges, sizes in zip(jumps, pairs, a.break_step_s.reshape(-1, 2),
                                        strict=True):
        start, end = edges[0].mean(), edges[1].mean()
        assert start == pytest.approx(at, abs=1.5 / 8000)
        assert end - start == pytest.approx(1.0e-3, abs=2.5 / 8000)  # |d| later
        assert sizes == pytest.approx([size, -size], abs=5e-6)
        # No piece reaches into the excursion.
        assert not np.any((a.window_start - T0 < end) & (a.window_end - T0 > start))
    residual = check_against_truth(a, m, ref)
    # The excursions' samples have no offset (no piece); everything else has one.
    assert np.count_nonzero(np.isnan(residual)) <= len(jumps) * 12


def test_a_step_next_to_a_gap_is_located() -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=101, duration_s=5)
    m = simulate("m", offset_s=-1.3e-3, drift_ppm=10.0, start_rel=0.004, seed=102,
                 duration_s=5, edits=(("gap", 2.0, 800),))
    m = with_stored_jumps(m, ((2.141, -88e-6),), seed=102)
    a = align_pair(wave(m), wave(ref))
    steps = np.isfinite(a.break_step_s)
    assert np.count_nonzero(steps) == 1 and np.count_nonzero(~steps) == 1
    lo, hi = a.breaks[steps][0] - T0
    assert lo < 2.141 < hi + 1e-9 and a.break_step_s[steps][0] == pytest.approx(-88e-6, abs=1e-6)
    check_against_truth(a, m, ref)


def test_gaps_split_windows_and_are_never_bridged() -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=31, duration_s=12,
                   edits=(("nan", 8.42, 4),))
    m = simulate("m", offset_s=-1.4e-3, drift_ppm=30.0, start_rel=0.004, seed=32,
                 duration_s=12, edits=(("gap", 3.71, 2400),))
    a = align_pair(wave(m), wave(ref))
    assert not np.isfinite(a.break_step_s).any()
    assert len(a.breaks) == 2
    gap_lo, gap_hi = a.breaks[0] - T0
    assert gap_hi - gap_lo == pytest.approx(2401 / 8000, abs=1e-6)
    # No window piece reaches into a gap.
    for lo, hi in a.breaks:
        assert not np.any((a.window_start < hi) & (a.window_end > lo))
    finite = np.isfinite(m.voltage)
    residual = sample_residual(a, m, ref)[finite]
    assert np.abs(residual).max() <= RESIDUAL_LIMIT_S
    error = a.offset_s - window_truth(a, m, ref)
    assert np.abs(error).max() <= RESIDUAL_LIMIT_S


@pytest.mark.parametrize("rate", [4000, 6400, 32000])
def test_other_and_bursty_rates_against_an_8khz_reference(rate: int) -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=10.0, seed=41, duration_s=6)
    m = simulate("m", offset_s=2.1e-3, drift_ppm=-35.0, rate=rate, start_rel=0.0311,
                 seed=42, duration_s=6)
    a = align_pair(wave(m), wave(ref))
    assert len(a) >= 5
    residual = sample_residual(a, m, ref)
    assert np.abs(residual).max() <= RESIDUAL_LIMIT_S
    error = a.offset_s - window_truth(a, m, ref)
    assert np.all(np.abs(error) <= a.uncertainty_s)


def test_answer_is_only_defined_within_half_a_mains_period() -> None:
    """13 ms off at ~50 Hz reads as about -7 ms: the caller's axes must agree to +-10 ms."""
    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=51, duration_s=4)
    m = simulate("m", offset_s=13e-3, drift_ppm=0.0, seed=52, duration_s=4)
    a = align_pair(wave(m), wave(ref))
    error = a.offset_s - window_truth(a, m, ref)
    period = 1.0 / 50.0
    assert np.all(np.abs(a.offset_s) <= 0.5 * period * 1.01)
    assert np.abs(error + period).max() < 20e-6  # off by one (local) mains period


def test_another_phase_is_a_time_shift_the_correlation_cannot_see() -> None:
    """A documented limit: in a balanced grid L2 is L1 delayed by a third of a period."""
    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=61, duration_s=4)
    other = simulate("other", offset_s=1e-3, drift_ppm=0.0, seed=63, duration_s=4, line=1)
    a = align_pair(wave(other), wave(ref))
    third = 1.0 / 50.0 / 3.0
    assert np.median(a.offset_s) == pytest.approx(1e-3 + third, abs=20e-6)
    assert a.correlation.min() > 0.99999


def test_a_different_signal_shows_in_the_correlation() -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=61, duration_s=4)
    m = simulate("m", offset_s=1e-3, drift_ppm=0.0, seed=62, duration_s=4)
    current = GridModel(seed=7).current(T0 + m.true_rel, circuit=3)[:, 0].astype(np.float32)
    good = align_pair(wave(m), wave(ref))
    bad = align_pair(Waveform("m", m.time, current), wave(ref))
    assert good.correlation.min() > 0.99999
    assert bad.correlation.max() < 0.999


def test_offset_at_is_nan_only_where_no_piece_exists() -> None:
    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=71, duration_s=5)
    m = simulate("m", offset_s=1e-3, drift_ppm=0.0, seed=72, duration_s=5,
                 edits=(("gap", 2.0, 2000),))
    a = align_pair(wave(m), wave(ref))
    t = T0 + np.array([-1.0, 0.5, 2.1, 4.5, 9.0])
    offset = a.offset_at(t)
    assert np.all(np.isfinite(offset))  # extrapolated up to the data's ends and the gap
    assert offset == pytest.approx(1e-3, abs=1e-6)


def test_too_little_data_between_gaps_gives_no_piece_and_says_why() -> None:
    """Half a second at 2 kHz cut by a gap (a short fly under load): no window piece has
    enough blocks, so there is no estimate, and the result says so instead of failing."""
    def short(m: SimMeter) -> Waveform:
        keep = m.time - T0 < 0.5
        return Waveform(m.name, m.time[keep], m.voltage[keep])

    ref = simulate("ref", offset_s=0.0, drift_ppm=0.0, rate=2000, seed=81, duration_s=0.5)
    m = simulate("m", offset_s=1e-3, drift_ppm=0.0, rate=2000, seed=82, duration_s=0.5,
                 edits=(("gap", 0.1, 100), ("gap", 0.3, 100)))
    for a in (align_pair(short(m), short(ref)), align([short(m), short(ref)], "ref")["m"]):
        assert len(a) == 0
        assert a.correlation.shape == a.n_samples.shape == (0,)
        assert len(a.breaks) == 2 and not np.isfinite(a.break_step_s).any()
        assert any("fewer than" in note and "no estimate" in note for note in a.notes)
        assert np.isnan(a.offset_at(m.time[:10])).all()


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_meter() -> None:
    t = T0 + np.arange(8000) / 8000
    v = np.sin(2 * math.pi * 50 * (t - T0)).astype(np.float32)
    with pytest.raises(AlignmentError, match="'m1'.*not strictly increasing at sample 5"):
        bad = t.copy()
        bad[5] = bad[4]
        Waveform("m1", bad, v)
    with pytest.raises(AlignmentError, match="'m2'.*float64"):
        Waveform("m2", t.astype(np.float32), v)
    with pytest.raises(AlignmentError, match="'m3'.*8000 times for 10 samples"):
        Waveform("m3", t, v[:10])
    with pytest.raises(AlignmentError, match="'m4'.*fewer than two"):
        Waveform("m4", np.full(3, np.nan), np.zeros(3))
    ok = Waveform("ok", t, v)
    slow = Waveform("slow", T0 + np.arange(100) / 100.0, np.zeros(100))
    with pytest.raises(AlignmentError, match="'slow'.*too coarse.*8 samples per mains period"):
        align_pair(slow, ok)
    with pytest.raises(AlignmentError, match="reference meter 'nope'"):
        align([ok, Waveform("x", t, v)], "nope")
    with pytest.raises(AlignmentError, match="whole number of blocks"):
        align_pair(Waveform("x", t, v), ok, window_s=1.05)
