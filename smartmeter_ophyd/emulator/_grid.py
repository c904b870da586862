"""The deterministic electrical grid every emulated meter samples.

Intent
------
One model, shared by all meters in all processes: a pure function of **true** unix time
(float64 seconds), a ``seed`` and a ``circuit`` number.  Two meters on the same line
therefore record the same voltage waveform, shifted only by their own timing error
(``_clock.MeterClock``), which is what lets tests check synchronisation end to end.

Voltage: three phases 120 degrees apart, 230 V rms (325 V peak), a fundamental whose
frequency wanders slowly, ``f(t) = f0 + a1 sin(2 pi t/T1) + a2 sin(2 pi t/T2)``, with the
phase taken from the closed-form integral of ``f`` (so it is exact at any t), small 3rd,
5th and 7th harmonics, and a slow per-line amplitude envelope (+-0.5 %, static unbalance
of a few tenths of a percent).  Line L2 lags L1 by 120 degrees, L3 by 240 degrees.

Current (mA): per circuit and line an always-on base load plus appliances switched by a
deterministic schedule: every appliance has 10-second slots (with its own phase) and is
on in a slot when a hash of (seed, circuit, appliance, slot) falls below its duty cycle.
Appliances are resistive (heater), inductive (motor, current lagging 30..45 degrees) and a
rectifier (switched-mode supply: narrow current pulses at the voltage peaks, odd harmonics
up to the 11th).  Appliance sizes are drawn once per (seed, circuit).  Totals range from a
few hundred mA to about 20 A per line.

Latched readings (``snapshot``) and energies (``energy_wh``) come from the same phasors,
so RMS, power and the waveform agree.  Energy is integrated in closed form.

Limits
------
* Stiff grid: loads do not change the voltage; appliances are ideal current sources
  (their current does not follow the voltage envelope) and switch instantly (no inrush,
  no ADE filter settling).
* Reactive power is the Budeanu sum over harmonics; "phase angle" is the fundamental
  voltage-current angle in [0, 360) degrees (lagging current positive), as the ADE9000's
  ANGL register reads it (Appendix A).
* No measurement noise here: that belongs to each meter (``_sampling``).
* Time precision is that of float64 unix seconds (about 0.24 microseconds in this era).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final

import numpy as np

__all__ = [
    "GRID_EPOCH", "SLOT_S", "Appliance", "GridModel", "GridSnapshot", "hash_u64", "mix_u64",
]

GRID_EPOCH: Final = 1_700_000_000.0
"""Times are taken relative to this whole second to keep phase arithmetic precise."""

SLOT_S: Final = 10.0
"""Length of an appliance switching slot (s)."""

_TWO_PI: Final = 2.0 * math.pi
_VOLTAGE_HARMONICS: Final = (1, 3, 5, 7)
_CURRENT_HARMONICS: Final = (1, 3, 5, 7, 9, 11)
_LINE_SHIFT: Final = _TWO_PI / 3.0

_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)
_HASH_START_ARRAY: Final = np.uint64(0x243F6A8885A308D3)


def hash_u64(*parts: np.ndarray | int) -> np.ndarray:
    """A counter-based 64-bit hash (splitmix64 finaliser chained over ``parts``).

    Vectorised: array parts broadcast.  Used for switching schedules and per-sample noise,
    so a value depends only on its key, never on call order or batch size.
    """
    h = np.full(1, _HASH_START_ARRAY, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            p = np.asarray(part)
            if p.dtype != np.uint64:
                p = p.astype(np.int64).view(np.uint64) if p.dtype.kind in "iu" else p
            x = (h ^ p) + _GOLDEN
            x = (x ^ (x >> np.uint64(30))) * _MIX1
            x = (x ^ (x >> np.uint64(27))) * _MIX2
            h = x ^ (x >> np.uint64(31))
    return h


_U64: Final = (1 << 64) - 1
_HASH_START: Final = 0x243F6A8885A308D3
_GOLDEN_INT: Final = int(_GOLDEN)
_MIX1_INT: Final = int(_MIX1)
_MIX2_INT: Final = int(_MIX2)


def _turns(tr: np.ndarray, period: float) -> np.ndarray:
    """Fractional part of ``tr / period``: keeps trig arguments small (fast and exact)."""
    x = tr * (1.0 / period)
    return x - np.floor(x)


def mix_u64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 finaliser round on a uint64 array (wraps silently, as intended)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def _unit_interval(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass(frozen=True)
class Appliance:
    """One load on one line: complex current phasors (peak mA) per harmonic of that line's
    voltage, and its switching behaviour."""

    name: str
    line: int
    """0, 1, 2 for L1..L3."""
    phasors: tuple[complex, ...]
    """Peak current (mA) per entry of the current harmonics (1, 3, 5, 7, 9, 11), as
    ``I_k e^{i psi_k}`` relative to the line's own voltage angle."""
    duty: float
    """Probability of being on in a slot (1.0 = always on)."""
    slot_phase_s: float
    """Offset of this appliance's slot grid (s), so appliances do not switch together."""


@dataclass(frozen=True)
class GridSnapshot:
    """What the ADE9000's RMS/power/angle registers would read at one instant (per line)."""

    t_true: float
    voltage_rms: np.ndarray
    """(3,) V."""
    current_rms: np.ndarray
    """(3,) mA."""
    neutral_current_rms: float
    """mA (the 4th current the firmware reads into a 3-element buffer, §12 #10)."""
    active_power: np.ndarray
    """(3,) W."""
    reactive_power: np.ndarray
    """(3,) var."""
    apparent_power: np.ndarray
    """(3,) VA (true apparent power; the firmware reports reactive here, §12 #9)."""
    frequency: np.ndarray
    """(3,) Hz (the firmware's getPeriod, §12 #13)."""
    phase_angle: np.ndarray
    """(3,) degrees in [0, 360), voltage minus current fundamental angle."""


@dataclass(frozen=True)
class _CircuitLoads:
    appliances: tuple[Appliance, ...]
    always_on: np.ndarray  # (A,) bool
    duty: np.ndarray  # (A,)
    slot_phase: np.ndarray  # (A,)
    weights: np.ndarray  # (A, K, 3) complex: phasor of appliance a, harmonic k, in L1 angle units
    power_w: np.ndarray  # (A,) active W at nominal envelope
    reactive_var: np.ndarray  # (A,)
    line: np.ndarray  # (A,) int


@dataclass(frozen=True)
class GridModel:
    """Deterministic three-phase grid; see the module docstring."""

    seed: int = 0
    nominal_hz: float = 50.0
    v_rms: float = 230.0
    wander_hz: tuple[float, float] = (0.03, 0.01)
    """Amplitudes a1, a2 of the frequency wander (Hz)."""
    wander_period_s: tuple[float, float] = (600.0, 47.0)
    """Periods T1, T2 of the frequency wander (s)."""
    voltage_harmonics: tuple[float, float, float] = (0.02, 0.03, 0.01)
    """Relative amplitudes of the 3rd, 5th and 7th voltage harmonics."""
    envelope_depth: float = 0.005
    envelope_period_s: float = 900.0
    unbalance: tuple[float, float, float] = (0.002, -0.003, 0.001)
    _circuits: dict[int, _CircuitLoads] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not 40.0 <= self.nominal_hz <= 70.0:
            raise ValueError(f"nominal_hz {self.nominal_hz} is not a mains frequency")
        if self.v_rms <= 0:
            raise ValueError(f"v_rms must be positive, not {self.v_rms}")

    # ------------------------------------------------------------------ voltage pieces

    @cached_property
    def _voltage_coefficients(self) -> np.ndarray:
        """(4, 3) complex: peak V of harmonic k on line l, relative to L1's angle powers."""
        rel = np.array([1.0, *self.voltage_harmonics])
        fundamental_peak = self.v_rms * math.sqrt(2.0) / math.sqrt(float(np.sum(rel**2)))
        rng = np.random.default_rng([self.seed, 0x56])
        phases = np.concatenate([[0.0], rng.uniform(0, _TWO_PI, size=3)])
        coef = np.empty((len(_VOLTAGE_HARMONICS), 3), dtype=np.complex128)
        for row, k in enumerate(_VOLTAGE_HARMONICS):
            for line in range(3):
                coef[row, line] = (
                    fundamental_peak * rel[row] * np.exp(1j * (phases[row] - k * line * _LINE_SHIFT))
                )
        return coef

    def phase_cycles(self, t_true: np.ndarray) -> np.ndarray:
        """L1 fundamental phase in cycles since ``GRID_EPOCH`` (closed-form integral of f)."""
        tr = np.asarray(t_true, dtype=np.float64) - GRID_EPOCH
        (a1, a2), (p1, p2) = self.wander_hz, self.wander_period_s
        cycles = self.nominal_hz * tr
        cycles += (a1 * p1 / _TWO_PI) * (1.0 - np.cos(_TWO_PI * _turns(tr, p1)))
        cycles += (a2 * p2 / _TWO_PI) * (1.0 - np.cos(_TWO_PI * _turns(tr, p2)))
        return cycles

    def frequency(self, t_true: np.ndarray | float) -> np.ndarray:
        """Instantaneous fundamental frequency (Hz)."""
        tr = np.asarray(t_true, dtype=np.float64) - GRID_EPOCH
        (a1, a2), (p1, p2) = self.wander_hz, self.wander_period_s
        return (
            self.nominal_hz
            + a1 * np.sin(_TWO_PI * _turns(tr, p1))
            + a2 * np.sin(_TWO_PI * _turns(tr, p2))
        )

    def _harmonic_basis(self, t_true: np.ndarray) -> np.ndarray:
        """(n, 12) Fortran-ordered ``cos(k theta), sin(k theta)`` for k = 1, 3, ..., 11.

        theta is L1's fundamental angle.  Built by rotating by 2 theta (real arithmetic and
        one cos/sin pair per sample), because ``Im(z^k C) = sin(k theta) Re C + cos(k theta)
        Im C`` turns every signal into one real matrix product (complex matmul is slow).
        """
        cycles = self.phase_cycles(t_true)
        cycles -= np.floor(cycles)
        angle = cycles * _TWO_PI
        count = len(_CURRENT_HARMONICS)
        basis = np.empty((angle.shape[0], 2 * count), dtype=np.float64, order="F")
        c, sn = np.cos(angle), np.sin(angle)
        basis[:, 0], basis[:, count] = c, sn
        c2 = c * c - sn * sn
        s2 = 2.0 * c * sn
        for col in range(1, count):
            pc, ps = basis[:, col - 1], basis[:, count + col - 1]
            basis[:, col] = pc * c2 - ps * s2
            basis[:, count + col] = ps * c2 + pc * s2
        return basis

    @staticmethod
    def _real_coefficients(coef: np.ndarray) -> np.ndarray:
        """(K, m) complex -> (2K, m) real so that ``basis @ out == Im(z^k @ coef)``."""
        padded = np.zeros((len(_CURRENT_HARMONICS), coef.shape[1]), dtype=np.complex128)
        padded[: coef.shape[0]] = coef
        return np.ascontiguousarray(np.vstack([padded.imag, padded.real]))

    def envelope(self, t_true: np.ndarray | float) -> np.ndarray:
        """(n, 3) per-line amplitude factor (1 = nominal)."""
        tr = np.atleast_1d(np.asarray(t_true, dtype=np.float64)) - GRID_EPOCH
        angle = _TWO_PI * _turns(tr, self.envelope_period_s)
        # sin(a + line*120deg) = sin a cos(line*120deg) + cos a sin(line*120deg)
        shifts = np.array([0.0, _LINE_SHIFT, 2 * _LINE_SHIFT])
        factor: np.ndarray = (1.0 + np.asarray(self.unbalance)) + self.envelope_depth * (
            np.sin(angle)[:, None] * np.cos(shifts) + np.cos(angle)[:, None] * np.sin(shifts)
        )
        return factor

    def _envelope_integral(self, t0: np.ndarray, t1: np.ndarray, line: np.ndarray) -> np.ndarray:
        """Integral of the envelope of ``line`` over [t0, t1] (s), element-wise."""
        omega = _TWO_PI / self.envelope_period_s
        phase = line * _LINE_SHIFT
        base = 1.0 + np.asarray(self.unbalance)[line]
        integral: np.ndarray = base * (t1 - t0) + (self.envelope_depth / omega) * (
            np.cos((t0 - GRID_EPOCH) * omega + phase) - np.cos((t1 - GRID_EPOCH) * omega + phase)
        )
        return integral

    # ------------------------------------------------------------------ public signals

    def voltage(self, t_true: np.ndarray) -> np.ndarray:
        """(n, 3) float64 instantaneous volts of L1..L3 at the true instants ``t_true``."""
        t = np.atleast_1d(np.asarray(t_true, dtype=np.float64))
        coef = self.__dict__.get("_voltage_real")
        if coef is None:
            coef = self._real_coefficients(self._voltage_coefficients)
            self.__dict__["_voltage_real"] = coef
        volts: np.ndarray = (self._harmonic_basis(t) @ coef) * self.envelope(t)
        return volts

    def current(self, t_true: np.ndarray, circuit: int) -> np.ndarray:
        """(n, 3) float64 instantaneous mA of the loads of ``circuit`` on L1..L3."""
        return self.interleaved(t_true, circuit)[:, 1::2]

    def voltage_current(self, t_true: np.ndarray, circuit: int) -> tuple[np.ndarray, np.ndarray]:
        """Both signals at once: ((n, 3) volts, (n, 3) mA)."""
        both = self.interleaved(t_true, circuit)
        return both[:, 0::2], both[:, 1::2]

    def interleaved(self, t_true: np.ndarray, circuit: int) -> np.ndarray:
        """(n, 6) float64 ``v1, i1, v2, i2, v3, i3`` (V, mA): the firmware's full waveform
        sample layout (§4.2), computed with one phase evaluation and one real matrix product
        per constant load state (what the sampler uses)."""
        t = np.atleast_1d(np.asarray(t_true, dtype=np.float64))
        n = t.shape[0]
        basis = self._harmonic_basis(t)
        masks = self._state_masks(t, circuit)
        if n == 0:
            return np.empty((0, 6), dtype=np.float64)
        out: np.ndarray
        if masks[0] == masks[-1] and (n < 3 or bool(np.all(masks == masks[0]))):
            out = basis @ self._interleaved_coefficients(circuit, int(masks[0]))
        else:
            out = np.empty((n, 6), dtype=np.float64)
            for mask in np.unique(masks):
                rows = masks == mask
                out[rows] = basis[rows] @ self._interleaved_coefficients(circuit, int(mask))
        out[:, 0::2] *= self.envelope(t)
        return out

    def _interleaved_coefficients(self, circuit: int, mask: int) -> np.ndarray:
        """(12, 6) real coefficients: voltage (even columns) and current (odd columns)."""
        cache = self.__dict__.setdefault("_interleaved_cache", {})
        key = (circuit, mask)
        coef: np.ndarray | None = cache.get(key)
        if coef is None:
            complex_coef = np.zeros((len(_CURRENT_HARMONICS), 6), dtype=np.complex128)
            complex_coef[: len(_VOLTAGE_HARMONICS), 0::2] = self._voltage_coefficients
            complex_coef[:, 1::2] = self._mask_coefficients(circuit, mask)
            coef = self._real_coefficients(complex_coef)
            if len(cache) > 4096:
                cache.clear()
            cache[key] = coef
        return coef

    def _mask_coefficients(self, circuit: int, mask: int) -> np.ndarray:
        """(K, 3) summed current phasors of the appliances in ``mask`` (cached)."""
        cache = self.__dict__.setdefault("_mask_cache", {})
        key = (circuit, mask)
        coef: np.ndarray | None = cache.get(key)
        if coef is None:
            loads = self.loads(circuit)
            on = np.array([(mask >> a) & 1 for a in range(len(loads.appliances))], dtype=bool)
            coef = loads.weights[on].sum(axis=0)
            if len(cache) > 4096:
                cache.clear()
            cache[key] = coef
        return coef

    # ------------------------------------------------------------------ loads and schedule

    def loads(self, circuit: int) -> _CircuitLoads:
        """The appliances of ``circuit`` (drawn once from (seed, circuit), then cached)."""
        cached = self._circuits.get(circuit)
        if cached is None:
            cached = self._build_loads(circuit)
            self._circuits[circuit] = cached
        return cached

    def _build_loads(self, circuit: int) -> _CircuitLoads:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, circuit & 0xFFFFFFFF, 0x10AD])
        sqrt2 = math.sqrt(2.0)
        appliances: list[Appliance] = []
        for line in range(3):
            def rad(deg: float) -> complex:
                return complex(np.exp(-1j * math.radians(deg)))

            # Always-on base load: mostly resistive, slightly inductive, a little 3rd harmonic.
            base = rng.uniform(300.0, 800.0) * sqrt2
            lag = rng.uniform(8.0, 20.0)
            appliances.append(Appliance(
                "base", line, (base * rad(lag), 0.05 * base * rad(3 * lag), 0, 0, 0, 0),
                duty=1.0, slot_phase_s=0.0))
            heater = rng.uniform(4000.0, 10000.0) * sqrt2
            appliances.append(Appliance(
                "heater", line, (heater, 0, 0, 0, 0, 0),
                duty=0.3, slot_phase_s=float(rng.uniform(0, SLOT_S))))
            motor = rng.uniform(1500.0, 5000.0) * sqrt2
            lag = rng.uniform(30.0, 45.0)
            appliances.append(Appliance(
                "motor", line, (motor * rad(lag), 0.03 * motor * rad(3 * lag + 40), 0, 0, 0, 0),
                duty=0.35, slot_phase_s=float(rng.uniform(0, SLOT_S))))
            # Rectifier: all odd harmonics peak together at the voltage maximum (theta = 90 deg):
            # sin(k*90deg) = (-1)^((k-1)/2), so alternate signs align the pulses.
            fund = rng.uniform(400.0, 1800.0) * sqrt2
            lead = rng.uniform(0.0, 8.0)
            rel = (1.0, 0.85, 0.65, 0.45, 0.25, 0.12)
            pulses = tuple(
                fund * r * (-1) ** ((k - 1) // 2) * rad(-lead * k)
                for r, k in zip(rel, _CURRENT_HARMONICS, strict=True)
            )
            appliances.append(Appliance(
                "rectifier", line, pulses, duty=0.5, slot_phase_s=float(rng.uniform(0, SLOT_S))))

        count = len(appliances)
        if count > 62:
            raise ValueError("too many appliances for a 64-bit state mask")
        weights = np.zeros((count, len(_CURRENT_HARMONICS), 3), dtype=np.complex128)
        vcoef = self._voltage_coefficients
        power = np.zeros(count)
        reactive = np.zeros(count)
        for a, app in enumerate(appliances):
            for row, k in enumerate(_CURRENT_HARMONICS):
                weights[a, row, app.line] = app.phasors[row] * np.exp(-1j * k * app.line * _LINE_SHIFT)
            for row in range(len(_VOLTAGE_HARMONICS)):
                s = vcoef[row, app.line] * np.conj(weights[a, row, app.line]) / 2.0 / 1000.0
                power[a] += s.real
                reactive[a] += s.imag
        return _CircuitLoads(
            appliances=tuple(appliances),
            always_on=np.array([a.duty >= 1.0 for a in appliances]),
            duty=np.array([a.duty for a in appliances]),
            slot_phase=np.array([a.slot_phase_s for a in appliances]),
            weights=weights,
            power_w=power,
            reactive_var=reactive,
            line=np.array([a.line for a in appliances]),
        )

    def _slot_on(self, loads: _CircuitLoads, circuit: int, appliance: np.ndarray,
                 slot: np.ndarray) -> np.ndarray:
        """Whether ``appliance`` is on in ``slot`` (element-wise)."""
        u = _unit_interval(hash_u64(self.seed, circuit, appliance, slot))
        on: np.ndarray = (u < loads.duty[appliance]) | loads.always_on[appliance]
        return on

    def _slot_on_scalar(self, circuit: int, appliance: int, slot: int) -> bool:
        """Scalar twin of ``_slot_on`` in plain Python integers (cheaper for one key)."""
        h = _HASH_START
        for part in (self.seed, circuit, appliance, slot):
            x = ((h ^ (part & _U64)) + _GOLDEN_INT) & _U64
            x = ((x ^ (x >> 30)) * _MIX1_INT) & _U64
            x = ((x ^ (x >> 27)) * _MIX2_INT) & _U64
            h = x ^ (x >> 31)
        loads = self.loads(circuit)
        return bool(loads.always_on[appliance]) or (h >> 11) * (1.0 / 2**53) < loads.duty[appliance]

    def _segment(self, circuit: int, tr: float) -> tuple[float, float, int]:
        """(start, end, mask): the interval around ``tr`` (relative to GRID_EPOCH) in which
        no appliance of ``circuit`` switches, and the on-mask there.  Cached."""
        cache: list[tuple[float, float, int]] = self.__dict__.setdefault(
            "_segment_cache", {}
        ).setdefault(circuit, [])
        for seg in cache:
            if seg[0] <= tr < seg[1]:
                return seg
        loads = self.loads(circuit)
        start, end, mask = -math.inf, math.inf, 0
        for a in range(len(loads.appliances)):
            if loads.always_on[a]:
                mask |= 1 << a
                continue
            phase = float(loads.slot_phase[a])
            slot = math.floor((tr - phase) / SLOT_S)
            start = max(start, slot * SLOT_S + phase)
            end = min(end, (slot + 1) * SLOT_S + phase)
            if self._slot_on_scalar(circuit, a, slot):
                mask |= 1 << a
        seg = (start, end, mask)
        cache.insert(0, seg)
        del cache[16:]
        return seg

    def _state_masks(self, t: np.ndarray, circuit: int) -> np.ndarray:
        """(n,) int64 bit mask of the appliances that are on at each instant."""
        n = t.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        tr = t - GRID_EPOCH
        lo, hi = float(tr.min()), float(tr.max())
        start, end, mask = self._segment(circuit, lo)
        if hi < end:
            return np.full(n, mask, dtype=np.int64)
        if hi - lo > 1000 * SLOT_S:
            return self._state_masks_bulk(tr, circuit)
        masks = np.empty(n, dtype=np.int64)
        edges = [lo]
        values = [mask]
        while end <= hi:
            edges.append(end)
            start, end, mask = self._segment(circuit, end)
            values.append(mask)
        index = np.searchsorted(np.array(edges), tr, side="right") - 1
        masks[:] = np.array(values, dtype=np.int64)[index]
        return masks

    def _state_masks_bulk(self, tr: np.ndarray, circuit: int) -> np.ndarray:
        """Vectorised masks for long spans (many switching slots)."""
        loads = self.loads(circuit)
        masks = np.zeros(tr.shape[0], dtype=np.int64)
        for a in range(len(loads.appliances)):
            if loads.always_on[a]:
                masks |= np.int64(1 << a)
                continue
            slots = np.floor((tr - loads.slot_phase[a]) / SLOT_S).astype(np.int64)
            on = self._slot_on(loads, circuit, np.array([a]), slots)
            masks |= on.astype(np.int64) << np.int64(a)
        return masks

    # ------------------------------------------------------------------ registers

    def snapshot(self, t_true: float, circuit: int) -> GridSnapshot:
        """RMS, power, frequency and angle readings at ``t_true`` for ``circuit``."""
        values = self.snapshot_arrays(np.array([t_true], dtype=np.float64), circuit)
        return GridSnapshot(
            t_true=float(t_true),
            voltage_rms=values["voltage_rms"][0],
            current_rms=values["current_rms"][0],
            neutral_current_rms=float(values["neutral_current_rms"][0]),
            active_power=values["active_power"][0],
            reactive_power=values["reactive_power"][0],
            apparent_power=values["apparent_power"][0],
            frequency=values["frequency"][0],
            phase_angle=values["phase_angle"][0],
        )

    def snapshot_arrays(self, t_true: np.ndarray, circuit: int) -> dict[str, np.ndarray]:
        """Vectorised ``snapshot``: every entry has a leading axis of len(t_true)."""
        t = np.atleast_1d(np.asarray(t_true, dtype=np.float64))
        loads = self.loads(circuit)
        masks = self._state_masks(t, circuit)
        n_app = len(loads.appliances)
        on = ((masks[:, None] >> np.arange(n_app, dtype=np.int64)) & 1).astype(np.float64)
        env = self.envelope(t)  # (n, 3)
        # Current phasors (n, K, 3) and voltage phasors (K_v, 3).
        phasors = np.einsum("na,akl->nkl", on, loads.weights)
        vcoef = self._voltage_coefficients
        current_rms = np.sqrt(np.sum(np.abs(phasors) ** 2, axis=1) / 2.0)
        neutral = np.sqrt(np.sum(np.abs(phasors.sum(axis=2)) ** 2, axis=1) / 2.0)
        # Per-appliance power scales with the envelope (current sources).
        power_by_line = np.zeros((n_app, 3))
        reactive_by_line = np.zeros((n_app, 3))
        power_by_line[np.arange(n_app), loads.line] = loads.power_w
        reactive_by_line[np.arange(n_app), loads.line] = loads.reactive_var
        active = (on @ power_by_line) * env
        reactive = (on @ reactive_by_line) * env
        voltage_rms = self.v_rms * env
        fundamental_angle = np.angle(vcoef[0])[None, :] - np.angle(phasors[:, 0, :])
        angle = np.degrees(np.mod(fundamental_angle, _TWO_PI))
        freq = np.repeat(self.frequency(t)[:, None], 3, axis=1)
        return {
            "voltage_rms": voltage_rms,
            "current_rms": current_rms,
            "neutral_current_rms": neutral,
            "active_power": active,
            "reactive_power": reactive,
            "apparent_power": voltage_rms * current_rms / 1000.0,
            "frequency": freq,
            "phase_angle": angle,
        }

    def energy_wh(self, t0_true: float, t1_true: float, circuit: int) -> np.ndarray:
        """(3,) active energy (Wh) of ``circuit`` per line over [t0, t1], in closed form."""
        if t1_true < t0_true:
            raise ValueError(f"energy interval ends before it starts: {t0_true} > {t1_true}")
        loads = self.loads(circuit)
        out = np.zeros(3)
        if t1_true == t0_true:
            return out
        r0, r1 = t0_true - GRID_EPOCH, t1_true - GRID_EPOCH
        for a in range(len(loads.appliances)):
            line = np.array([loads.line[a]])
            if loads.always_on[a]:
                joules = loads.power_w[a] * self._envelope_integral(
                    np.array([t0_true]), np.array([t1_true]), line)[0]
                out[loads.line[a]] += joules
                continue
            phase = loads.slot_phase[a]
            first = math.floor((r0 - phase) / SLOT_S)
            last = math.floor((r1 - phase) / SLOT_S)
            # In pieces of at most 2**20 slots (~4 months) to bound memory on long spans.
            for piece in range(first, last + 1, 1 << 20):
                slots = np.arange(piece, min(piece + (1 << 20), last + 1), dtype=np.int64)
                on = self._slot_on(loads, circuit, np.array([a]), slots)
                starts = np.maximum(slots * SLOT_S + phase, r0)[on] + GRID_EPOCH
                ends = np.minimum((slots + 1) * SLOT_S + phase, r1)[on] + GRID_EPOCH
                lines = np.full(starts.shape, loads.line[a])
                out[loads.line[a]] += loads.power_w[a] * float(
                    np.sum(self._envelope_integral(starts, ends, lines)))
        return out / 3600.0
