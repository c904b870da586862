"""Meters sampling the emulator's grid model at known true instants (test ground truth).

A simulated meter has a clock ``recorded = true + offset + drift * (true - T0)``; its ADE
clock ticks uniformly in *recorded* time (the meter's own notion of a sample period), so
sample ``n`` is stamped ``start + n / rate`` and was truly taken at the inverse of the clock
map.  Edits reproduce what the firmware does to the stored stream: a duplicated sample
(§6.5 positive correction), consecutive dropped samples (negative correction), a gap of
missing samples, NaN values.  Noise mimics ``emulator/_sampling.py``: triangular noise of
0.05 V rms, quantised to the ADE9000 waveform LSB, stored as float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from smartmeter_ophyd.emulator._grid import GridModel
from smartmeter_ophyd.protocol import decimation

T0 = 1_700_000_321.0
"""Epoch of the simulations (true and recorded times are kept relative to it)."""
NOISE_V = 0.05
LSB_V = 994.7 / 67_107_786 / 2


@dataclass
class SimMeter:
    name: str
    offset_s: float
    drift_ppm: float
    rel_time: np.ndarray
    """Recorded time minus T0 (exact, float64 of a small number)."""
    true_rel: np.ndarray
    """True sampling instant minus T0."""
    voltage: np.ndarray

    @property
    def time(self) -> np.ndarray:
        return T0 + self.rel_time

    def recorded_rel(self, true_rel: np.ndarray) -> np.ndarray:
        """What this meter's clock reads (minus T0) at true instants (minus T0)."""
        return true_rel * (1.0 + self.drift_ppm * 1e-6) + self.offset_s


def simulate(
    name: str,
    *,
    offset_s: float,
    drift_ppm: float,
    rate: int = 8000,
    start_rel: float = 0.0,
    duration_s: float = 10.0,
    line: int = 0,
    seed: int = 0,
    noise_v: float = NOISE_V,
    edits: tuple[tuple[str, float, int], ...] = (),
    grid: GridModel | None = None,
) -> SimMeter:
    """A meter stream; ``edits`` are ``(kind, at_s, n)`` with kind dup/drop/gap/nan."""
    grid = grid or GridModel(seed=7)
    dec = decimation(rate)
    per_second = dec.rate
    # Stream positions of the stored samples: bursty rates keep the first ``rate`` lattice
    # points of every second (§4.3), uniform ones all.
    seconds = int(math.ceil(duration_s)) + 1
    lattice = np.arange(per_second) * (dec.keep_every / dec.internal_rate)
    rel = (np.arange(seconds)[:, None] + lattice[None, :]).ravel() + start_rel
    taken = rel.copy()  # the instant (recorded) each stored value was taken
    stamps = rel.copy()
    for kind, at_s, n in edits:
        j = int(np.searchsorted(stamps, start_rel + at_s))
        if kind == "dup":
            # The firmware stores the same sample twice; every later value is one slot late.
            taken = np.concatenate([taken[:j + 1], taken[j:j + 1], taken[j + 1:-1]])
        elif kind == "drop":
            taken = np.concatenate([taken[:j], taken[j + n:], taken[-1:] + np.arange(1, n + 1)
                                    * (dec.keep_every / dec.internal_rate)])
        elif kind == "gap":
            keep = np.ones(stamps.size, dtype=bool)
            keep[j:j + n] = False
            taken, stamps = taken[keep], stamps[keep]
        elif kind != "nan":
            raise ValueError(kind)
    inside = stamps < start_rel + duration_s
    taken, stamps = taken[inside], stamps[inside]
    k = drift_ppm * 1e-6
    true_rel = (taken - offset_s) / (1.0 + k)
    volts = grid.voltage(T0 + true_rel)[:, line]
    rng = np.random.default_rng(seed)
    noise = (rng.random(volts.size) + rng.random(volts.size) - 1.0) * noise_v * math.sqrt(6.0)
    values = (np.rint((volts + noise) / LSB_V) * LSB_V).astype(np.float32)
    for kind, at_s, n in edits:
        if kind == "nan":
            j = int(np.searchsorted(stamps, start_rel + at_s))
            values[j:j + n] = np.nan
    return SimMeter(name, offset_s, drift_ppm, stamps, true_rel, values)


def true_offset(meter: SimMeter, reference: SimMeter) -> np.ndarray:
    """Per meter sample: meter stamp minus the stamp the reference gives the same instant."""
    return meter.rel_time - reference.recorded_rel(meter.true_rel)
