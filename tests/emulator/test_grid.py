"""The shared grid model: deterministic, 50 Hz three-phase with harmonics and switching loads."""

from __future__ import annotations

import numpy as np
import pytest

from smartmeter_ophyd.emulator._grid import GRID_EPOCH, SLOT_S, GridModel

T0 = 1_750_000_000.0
FS = 8000


def _times(seconds: float, fs: int = FS, start: float = T0) -> np.ndarray:
    return start + np.arange(int(seconds * fs)) / fs


def _spectrum(x: np.ndarray, fs: int = FS) -> tuple[np.ndarray, np.ndarray]:
    window = np.hanning(x.shape[0])
    spec = np.fft.rfft(x * window)
    freqs = np.fft.rfftfreq(x.shape[0], 1 / fs)
    return freqs, spec


def _bin(freqs: np.ndarray, spec: np.ndarray, f: float) -> complex:
    return complex(spec[np.argmin(np.abs(freqs - f))])


def test_same_seed_same_signals_and_seed_matters() -> None:
    t = _times(0.5)
    a, b = GridModel(seed=7), GridModel(seed=7)
    assert np.array_equal(a.voltage(t), b.voltage(t))
    assert np.array_equal(a.current(t, 2), b.current(t, 2))
    other = GridModel(seed=8)
    assert not np.allclose(a.current(t, 2), other.current(t, 2))
    # Circuits are different load sets on the same voltage.
    assert not np.allclose(a.current(t, 1), a.current(t, 2))


def test_values_do_not_depend_on_batching() -> None:
    # Pure function of time: batching may only change floating-point summation order.
    grid = GridModel(seed=3)
    t = _times(25.0, fs=400)  # spans several switching slots
    whole = grid.interleaved(t, 0)
    pieces = np.concatenate([grid.interleaved(chunk, 0) for chunk in np.array_split(t, 37)])
    assert np.allclose(whole, pieces, rtol=1e-12, atol=1e-9)
    one_by_one = np.array([grid.interleaved(t[i:i + 1], 0)[0] for i in range(0, t.shape[0], 97)])
    assert np.allclose(one_by_one, whole[::97], rtol=1e-12, atol=1e-9)
    fresh = GridModel(seed=3)
    assert np.allclose(fresh.interleaved(t[::-1], 0)[::-1], whole, rtol=1e-12, atol=1e-9)


def test_magnitudes_are_mains_like() -> None:
    grid = GridModel(seed=1)
    volts = grid.voltage(_times(1.0))
    rms = np.sqrt(np.mean(volts**2, axis=0))
    assert np.all(np.abs(rms - 230.0) < 230.0 * 0.012)
    assert 315 < np.max(np.abs(volts)) < 345
    # Currents over 10 minutes: from a few hundred mA to below ~25 A, per line.
    t = T0 + np.arange(0, 600, 0.5)
    current_rms = grid.snapshot_arrays(t, 0)["current_rms"]
    assert current_rms.min() > 200
    assert current_rms.max() < 25_000
    assert current_rms.max() > 5_000


def test_fundamental_is_50_hz_with_slow_wander() -> None:
    grid = GridModel(seed=1)
    t = _times(4.0)
    freqs, spec = _spectrum(grid.voltage(t)[:, 0])
    peak = freqs[np.argmax(np.abs(spec))]
    assert peak == pytest.approx(50.0, abs=0.3)
    # Interpolated peak agrees with the model's own frequency during the window.
    f_model = grid.frequency(t)
    assert np.all(np.abs(f_model - 50.0) <= sum(grid.wander_hz) + 1e-12)
    assert np.ptp(grid.frequency(T0 + np.arange(0, 600.0, 1.0))) > 0.02  # it does wander


def test_phase_is_the_integral_of_frequency() -> None:
    grid = GridModel(seed=1)
    t0, t1 = T0, T0 + 321.0
    fine = np.linspace(t0, t1, 2_000_001)
    integral = np.trapezoid(grid.frequency(fine), fine)
    cycles = grid.phase_cycles(np.array([t0, t1]))
    assert cycles[1] - cycles[0] == pytest.approx(integral, abs=1e-6)


def test_three_phases_are_120_degrees_apart() -> None:
    grid = GridModel(seed=1)
    t = _times(2.0)
    cycles = grid.phase_cycles(t)
    reference = np.exp(-2j * np.pi * cycles)
    volts = grid.voltage(t)
    # Demodulate each line against L1's phase: its angle is the line's lag.
    angles = np.degrees(np.angle(np.mean(volts * reference[:, None], axis=0) * 1j))
    lag_l2 = (angles[0] - angles[1]) % 360
    lag_l3 = (angles[0] - angles[2]) % 360
    assert lag_l2 == pytest.approx(120.0, abs=0.5)
    assert lag_l3 == pytest.approx(240.0, abs=0.5)


def test_voltage_has_small_odd_harmonics() -> None:
    grid = GridModel(seed=1)
    t = _times(2.0)
    cycles = grid.phase_cycles(t)
    v = grid.voltage(t)[:, 0]
    amplitude = {k: abs(np.mean(v * np.exp(-2j * np.pi * k * cycles))) * 2 for k in (1, 2, 3, 5, 7)}
    expected = dict(zip((3, 5, 7), grid.voltage_harmonics, strict=True))
    for k, rel in expected.items():
        assert amplitude[k] / amplitude[1] == pytest.approx(rel, rel=0.1)
    assert amplitude[2] / amplitude[1] < 1e-3  # no even harmonics


def test_rectifier_makes_current_harmonics_and_loads_switch() -> None:
    grid = GridModel(seed=1)
    loads = grid.loads(0)
    kinds = {app.name for app in loads.appliances}
    assert kinds == {"base", "heater", "motor", "rectifier"}
    t = T0 + np.arange(0, 300.0, 0.25)
    snap = grid.snapshot_arrays(t, 0)
    # Switching: each line sees several distinct load levels over five minutes.
    for line in range(3):
        assert len(np.unique(np.round(snap["current_rms"][:, line]))) >= 3
    # Harmonic-rich current somewhere: 3rd harmonic above 20 % of the fundamental.
    best = 0.0
    for start in T0 + np.arange(0, 120.0, SLOT_S / 2):
        tt = _times(0.2, start=start)
        cycles = grid.phase_cycles(tt)
        i = grid.current(tt, 0)
        for line in range(3):
            shift = np.exp(2j * np.pi * line / 3)
            h1 = abs(np.mean(i[:, line] * np.exp(-2j * np.pi * cycles) * shift))
            h3 = abs(np.mean(i[:, line] * np.exp(-6j * np.pi * cycles) * shift**3))
            best = max(best, h3 / h1)
    assert best > 0.2


def test_snapshot_agrees_with_the_waveform() -> None:
    grid = GridModel(seed=2)
    # Ten whole cycles inside one switching segment.
    start = T0 + 3.0
    t = _times(0.2, fs=32000, start=start)
    seg_start, seg_end, _ = grid._segment(1, start - GRID_EPOCH)
    assert seg_end > t[-1] - GRID_EPOCH, "window straddles a switch; pick another start"
    both = grid.interleaved(t, 1)
    v, i = both[:, 0::2], both[:, 1::2]
    snap = grid.snapshot(float(t[len(t) // 2]), 1)
    assert np.allclose(np.sqrt(np.mean(v**2, axis=0)), snap.voltage_rms, rtol=2e-3)
    assert np.allclose(np.sqrt(np.mean(i**2, axis=0)), snap.current_rms, rtol=2e-3)
    assert np.allclose(np.mean(v * i, axis=0) / 1000, snap.active_power, rtol=5e-3, atol=0.5)
    assert np.allclose(snap.apparent_power, snap.voltage_rms * snap.current_rms / 1000)
    assert np.all((snap.phase_angle >= 0) & (snap.phase_angle < 360))
    assert np.allclose(snap.frequency, grid.frequency(snap.t_true))
    neutral = np.sqrt(np.mean(np.sum(i, axis=1) ** 2))
    assert snap.neutral_current_rms == pytest.approx(neutral, rel=5e-3)


def test_energy_is_the_integral_of_active_power() -> None:
    grid = GridModel(seed=4)
    t0, t1 = T0 + 12.3, T0 + 12.3 + 95.0
    step = 0.01
    mid = np.arange(t0 + step / 2, t1, step)
    numeric = grid.snapshot_arrays(mid, 0)["active_power"].sum(axis=0) * step / 3600
    exact = grid.energy_wh(t0, t1, 0)
    assert np.allclose(exact, numeric, rtol=2e-3)
    assert np.all(exact > 0)
    # Additive over adjacent intervals.
    split = grid.energy_wh(t0, t0 + 40.0, 0) + grid.energy_wh(t0 + 40.0, t1, 0)
    assert np.allclose(split, exact, rtol=1e-12)
    assert np.array_equal(grid.energy_wh(t0, t0, 0), np.zeros(3))
    with pytest.raises(ValueError, match="ends before it starts"):
        grid.energy_wh(t1, t0, 0)


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError, match="mains frequency"):
        GridModel(nominal_hz=5.0)
    with pytest.raises(ValueError, match="v_rms"):
        GridModel(v_rms=-1.0)
