"""Per mains period: how badly a meter's samples match the reference at the same instants.

Intent
------
The block phasors compare two meters over the same *stamps*.  When both meters' stored
times jump at the same stamp (alike crystals, RTC seconds started together), their blocks,
or any windows on the stamps, shift alike and the comparison sees nothing; yet for ``|d|``
after the jump the two meters disagree about the same instant by the jump.  This pass
compares the meter's samples with the reference interpolated at the *same instant*,
``t - d(t)`` with ``d`` interpolated between the block offsets, and averages the squared
residual over each mains period.  An offset error ``e`` adds about ``(omega V_rms e)^2``
per sample, whatever its sign, duration or phase on the waveform, so a period holding an
excursion or a step stands out from its neighbours.

Limits
------
* Linear interpolation of the reference (an error of up to 2e-4 of the amplitude at 8 kHz),
  a gain or DC mismatch and a slowly wrong ``d`` raise the misfit of many periods alike:
  they form a baseline that the caller judges locally.
* Periods with fewer than four samples, touching a gap of either meter, or whose samples
  map outside the reference's data are not judged (NaN).
* Cost: one pass over the meter's samples, two linear interpolations per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._blocks import cell_runs, finite_chunks

__all__ = ["Reference", "period_misfit"]


@dataclass(frozen=True)
class Reference:
    """The reference's finite samples (the arrays themselves when all are finite)."""

    time: np.ndarray
    voltage: np.ndarray

    @classmethod
    def of(cls, time: np.ndarray, voltage: np.ndarray) -> Reference:
        good = np.isfinite(time) & np.isfinite(voltage)
        return cls(time, voltage) if good.all() else cls(time[good], voltage[good])


def period_misfit(time: np.ndarray, voltage: np.ndarray, ref: Reference, *, knots: np.ndarray,
                  offsets: np.ndarray, gain: float, origin: float, period_s: float,
                  n_periods: int, gaps: np.ndarray) -> np.ndarray:
    """Mean of ``(v - gain * ref(t - d(t)))^2`` (V^2) over each period
    ``[origin + p period_s, origin + (p + 1) period_s)``; ``d`` is linear between
    ``(knots, offsets)`` and held beyond them.  ``gaps`` (k, 2) are both meters' holes in
    the meter's time."""
    total = np.zeros(n_periods)
    count = np.zeros(n_periods, dtype=np.int64)
    if ref.time.size < 2 or knots.size == 0:
        return np.full(n_periods, np.nan)
    inv_period = 1.0 / period_s
    for t, v in finite_chunks(time, voltage):
        # Relative times keep the interpolation exact to float64 of small numbers.  Both
        # axes increase (d changes by microseconds per period): ends bound everything.
        rel = t - origin
        mapped = rel - np.interp(t, knots, offsets)
        a, b = np.searchsorted(ref.time, [mapped[0] + origin, mapped[-1] + origin])
        a, b = max(int(a) - 1, 0), min(int(b) + 1, ref.time.size)
        if b - a < 2:
            continue
        rt = ref.time[a:b] - origin
        if mapped[0] < rt[0] or mapped[-1] > rt[-1]:
            inside = (mapped >= rt[0]) & (mapped <= rt[-1])
            rel, v, mapped = rel[inside], v[inside], mapped[inside]
            if rel.size == 0:
                continue
        inside, runs, periods, lengths = cell_runs(rel * inv_period, n_periods)
        if periods.size == 0:
            continue
        residual = v[inside] - gain * np.interp(mapped[inside], rt, ref.voltage[a:b])
        residual *= residual
        total[periods] += np.add.reduceat(residual, runs)
        count[periods] += lengths
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    out[count < 4] = np.nan
    if gaps.size:
        first = np.floor((gaps[:, 0] - origin) * inv_period).astype(np.int64)
        last = np.floor((gaps[:, 1] - origin) * inv_period).astype(np.int64)
        for p0, p1 in zip(np.clip(first, 0, n_periods), np.clip(last + 1, 0, n_periods),
                          strict=True):
            out[p0:p1] = np.nan
    return out
