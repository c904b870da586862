"""Steps and short excursions in the residual offset of two meters, located to the sample.

Intent
------
Between breaks the residual offset ``d(t)`` of a meter against the reference is a line.  It
jumps wherever either meter's stored time jumps:

* a duplicated or dropped sample (§6.5 corrections, §4.10 fillers and drops): one sample;
* an RTC restart or a refused sample: the time model places the first row after an RTC edge
  mid-way on the ADE lattice (its ``placement_s``), so the stored time jumps by any fraction
  of a sample up to about one.

When the two meters' jumps fall on the same stamp (alike crystals, seconds started
together), ``d`` jumps and jumps back ``|d|`` later: an *excursion* far shorter than a
block.  Every change must become a break, or a window's line averages across it (or its
midpoint lands inside it).

Method
------
1. **Candidates.**  From the blocks: detrended block-to-block differences above the
   threshold (they see steps down to ``min_step_s`` wherever two blocks straddle them).
   From the per-period misfit (``_misfit``): periods whose misfit exceeds the local
   baseline (the median of their 0.5 s group) by six robust deviations.  The misfit sees
   what blocks cannot: excursions, and steps in the first or last block or next to a hole.
2. **Events.**  Overlapping candidates merge; an event's span is widened by a period and
   clipped at holes.  Up to three clean periods (judged, unflagged, hole-free) on each
   side are its *margins*.
3. **Location.**  On the meter's own samples over the span and margins, against the
   reference interpolated (cubic Hermite) at ``t - d``.  The meter's gain and DC and the
   offset line on each side (the local block slope, an intercept per side) are fitted on
   the margins by Gauss-Newton.  Between the margins, three hypotheses: the line before,
   the line after, and a middle stretch at a free offset.  The change points are chosen
   exhaustively (prefix sums and a running minimum: O(n)); the middle's offset starts
   from the samples neither side explains and alternates with the change points
   (Gauss-Newton on the stretch's inner samples).
4. **Decision.**  A middle stretch is kept when it lowers the misfit by more than
   ``STEP_SIGMAS**2`` sample variances against the best single step; a single step when it
   lowers it that much against no change.  A change becomes a break only if it is at least
   ``min_step_s``.  A block candidate that cannot be located (no margin on either side,
   too few samples) stays a break over its blocks.

Limits
------
* At most two changes per event: a third within one event's span (tens of milliseconds)
  is not located, and the stretch keeps a wrong offset.
* A change is placed between two meter samples; where the waveform's slope is small, a
  small step can land a few samples off.  The size of an excursion one or two samples
  long is rough (tens of percent): a sample taken while only one meter had jumped fits
  neither side.
* An excursion is found when the misfit it adds stands out of its period's noise: at 8 kHz
  with the emulator's noise (0.05 V on each meter) from about 5 us over 1 ms (eight
  samples) or about 15 us over one sample.  A smaller one stays inside a piece: it moves
  the piece's offset by nanoseconds, but an instant inside it is off by its height.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ._misfit import Reference
from ._stats import row_nanmedian

__all__ = ["STEP_SIGMAS", "Axis", "Change", "Changes", "OffsetSeries", "Samples",
           "find_changes"]

logger = logging.getLogger(__name__)

STEP_SIGMAS: Final = 10.0
"""Block steps and sample-level changes must stand out this much."""
_FLAG_SIGMAS: Final = 6.0
"""Periods whose misfit stands out this much start an event (the samples then decide)."""
_MEDIAN_SPAN: Final = 3
"""Half-width (blocks) of the running median that detrends block-to-block differences."""
_GROUP_PERIODS: Final = 25
"""Periods per group whose median is the misfit's local baseline."""
_MARGIN_PERIODS: Final = 3
"""Clean periods on each side of an event that fix the gain, DC and the side offsets."""
_REACH_SAMPLES: Final = 12
"""Largest offset of a middle stretch looked for, in meter samples (§6.5 corrects at most
ten samples per sync): samples this close to a hole of the reference are not compared."""
_UNEXPLAINED_SIGMAS: Final = 5.0
"""A sample neither side explains misses both by this many noise deviations."""
_NEWTON_STEPS: Final = 3


@dataclass(frozen=True)
class OffsetSeries:
    """Usable blocks, compacted, in grid order."""

    index: np.ndarray
    """int64: block index of each usable block."""
    offset: np.ndarray
    """float64: residual offset ``d`` (s) of the block."""
    period: np.ndarray
    """float64: local mains period (s)."""
    run: np.ndarray
    """int64: run id; a run is a stretch of consecutive usable blocks."""


@dataclass(frozen=True)
class Axis:
    """The shared grid: blocks of ``block_s`` and mains periods of ``period_s``."""

    origin: float
    block_s: float
    period_s: float

    def block_start(self, index: np.ndarray | int) -> np.ndarray:
        return self.origin + np.asarray(index, dtype=np.float64) * self.block_s

    def period_of(self, time: float) -> int:
        return int(math.floor((time - self.origin) / self.period_s))

    def period_start(self, index: int) -> float:
        return self.origin + index * self.period_s


@dataclass(frozen=True)
class Samples:
    """One meter's samples as given (finite or not)."""

    time: np.ndarray
    voltage: np.ndarray


@dataclass(frozen=True)
class Change:
    """A change of the offset: a break between two samples of the meter."""

    interval: tuple[float, float]
    """(last meter sample before, first after), or a candidate's blocks if not located."""
    size: float
    """Offset after minus before (s)."""
    located: bool


@dataclass(frozen=True)
class Changes:
    """What ``find_changes`` found, with the figures the notes report."""

    changes: list[Change]
    block_noise: float
    """Robust block-to-block offset noise (s); NaN without enough blocks."""
    excursions: int
    """Events resolved as a middle stretch (two changes, or one at the data's edge)."""
    unresolved: int
    """Events the samples could not decide (no margin on either side, too few samples)."""
    events: int


@dataclass(frozen=True)
class Prior:
    """What the blocks say about the offset: ``d`` at the usable blocks' centres and the
    local slope (s per s, robust to steps) there."""

    knots: np.ndarray
    offsets: np.ndarray
    slopes: np.ndarray

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return np.asarray(np.interp(t, self.knots, self.offsets))

    def slope_near(self, lo: float, hi: float, reach: float) -> float:
        near = (self.knots > lo - reach) & (self.knots < hi + reach) & np.isfinite(self.slopes)
        return float(np.median(self.slopes[near])) if near.any() else 0.0


@dataclass
class _Event:
    lo: float
    hi: float
    core_lo: float
    core_hi: float
    candidates: list[tuple[int, int, float]] = field(default_factory=list)
    """Block candidates inside: (first block, last block, size)."""


@dataclass(frozen=True)
class _Line:
    centre: float
    value: float
    slope: float

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return self.value + self.slope * (t - self.centre)


# ---------------------------------------------------------------------------------- entry


def find_changes(blocks: OffsetSeries, axis: Axis, misfit: np.ndarray, meter: Samples,
                 ref: Reference, ref_holes: np.ndarray, gaps: np.ndarray, *, gain: float,
                 misfit_floor: float, min_step_s: float) -> Changes:
    """Every step and excursion of ``meter - ref`` that the data can place (module doc).

    ``misfit`` is ``_misfit.period_misfit`` under the block offsets; ``ref_holes`` are the
    reference's holes in its own time, ``gaps`` both meters' holes in the meter's time
    (sorted by start).
    """
    candidates, block_noise, slopes = _block_candidates(blocks, min_step_s)
    prior = Prior(knots=axis.origin + (blocks.index + 0.5) * axis.block_s,
                  offsets=blocks.offset, slopes=slopes / axis.block_s)
    flagged = _flag_periods(misfit, misfit_floor)
    spans: list[tuple[float, float, tuple[int, int, float] | None]] = [
        (float(axis.block_start(a)), float(axis.block_start(b + 1)), (a, b, size))
        for a, b, size in candidates]
    spans += [(axis.period_start(p0), axis.period_start(p1 + 1), None)
              for p0, p1 in _groups(flagged)]
    events = _merge(spans, axis.period_s, gaps)
    clean = np.isfinite(misfit) & ~flagged
    changes: list[Change] = []
    excursions = unresolved = 0
    for i, event in enumerate(events):
        fence_lo = events[i - 1].hi if i else -math.inf
        fence_hi = events[i + 1].lo if i + 1 < len(events) else math.inf
        left = _margin(clean, axis, event.lo, before=True, fence=fence_lo)
        right = _margin(clean, axis, event.hi, before=False, fence=fence_hi)
        located = None
        if left is not None or right is not None:
            slope = prior.slope_near(event.lo, event.hi, 3 * axis.block_s)
            located = _locate(event, left, right, meter, ref, ref_holes, prior, slope,
                              gain, min_step_s)
        if located is None:
            unresolved += 1
            changes.extend(
                Change(interval=(float(axis.block_start(a)), float(axis.block_start(b + 1))),
                       size=size, located=False)
                for a, b, size in event.candidates)
            continue
        found, middle = located
        excursions += middle
        changes.extend(found)
    changes.sort(key=lambda c: c.interval[0])
    logger.debug("%d events: %d changes, %d excursions, %d unresolved", len(events),
                 len(changes), excursions, unresolved)
    return Changes(changes=changes, block_noise=block_noise, excursions=excursions,
                   unresolved=unresolved, events=len(events))


# ----------------------------------------------------------------------------- candidates


def _block_candidates(runs: OffsetSeries, threshold_floor: float) -> tuple[
        list[tuple[int, int, float]], float, np.ndarray]:
    """Steps in the block offsets: (first block, last block, size); the robust
    block-to-block noise (s); and per usable block the local slope (s per block: the running
    median of the differences around it)."""
    slopes = np.full(runs.index.size, np.nan)
    if runs.index.size < 3:
        return [], math.nan, slopes
    diff = np.diff(runs.offset)
    diff[runs.run[1:] != runs.run[:-1]] = np.nan
    padded = np.pad(diff, _MEDIAN_SPAN, constant_values=np.nan)
    view = np.lib.stride_tricks.sliding_window_view(padded, 2 * _MEDIAN_SPAN + 1)
    baseline = row_nanmedian(view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices at run edges
        slopes = np.nanmean(np.stack([np.append(baseline, np.nan),
                                      np.insert(baseline, 0, np.nan)]), axis=0)
    excess = diff - baseline
    finite = excess[np.isfinite(excess)]
    if finite.size == 0:
        return [], math.nan, slopes
    sigma = 1.4826 * float(np.median(np.abs(finite)))
    threshold = max(threshold_floor, STEP_SIGMAS * sigma)
    candidate = np.flatnonzero(np.abs(np.nan_to_num(excess)) > threshold / 2)
    found: list[tuple[int, int, float]] = []
    k = 0
    while k < candidate.size:
        group = [int(candidate[k])]
        if (k + 1 < candidate.size and candidate[k + 1] == candidate[k] + 1
                and np.sign(excess[candidate[k]]) == np.sign(excess[candidate[k + 1]])
                and runs.index[candidate[k] + 2] == runs.index[candidate[k]] + 2):
            group.append(int(candidate[k + 1]))
        k += len(group)
        size = float(np.sum(excess[group]))
        if abs(size) <= threshold:
            continue
        found.append((int(runs.index[group[0]]), int(runs.index[group[-1] + 1]), size))
    return found, sigma, slopes


def _flag_periods(misfit: np.ndarray, floor: float) -> np.ndarray:
    """Periods whose misfit exceeds their group's median by ``_FLAG_SIGMAS`` robust
    deviations (and by ``floor``)."""
    n = misfit.size
    groups = -(-n // _GROUP_PERIODS)
    padded = np.full(groups * _GROUP_PERIODS, np.nan)
    padded[:n] = misfit
    median = row_nanmedian(padded.reshape(groups, _GROUP_PERIODS))
    centres = (np.arange(groups) + 0.5) * _GROUP_PERIODS
    known = np.isfinite(median)
    if not known.any():
        return np.zeros(n, dtype=bool)
    baseline = np.interp(np.arange(n) + 0.5, centres[known], median[known])
    excess = misfit - baseline
    finite = np.abs(excess[np.isfinite(excess)])
    sigma = 1.4826 * float(np.median(finite)) if finite.size else math.inf
    return np.asarray(np.nan_to_num(excess, nan=-np.inf) > max(_FLAG_SIGMAS * sigma, floor))


def _groups(flagged: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) of each run of flagged periods (one unflagged period may separate the
    members of a run)."""
    where = np.flatnonzero(flagged)
    if where.size == 0:
        return []
    cut = np.flatnonzero(np.diff(where) > 2) + 1
    return [(int(g[0]), int(g[-1])) for g in np.split(where, cut)]


def _merge(spans: list[tuple[float, float, tuple[int, int, float] | None]], period: float,
           holes: np.ndarray) -> list[_Event]:
    """Events from candidate spans: overlapping ones merge; widened by a period, clipped at
    the holes next to the core."""
    events: list[_Event] = []
    for lo, hi, candidate in sorted(spans, key=lambda s: s[0]):
        if events and lo <= events[-1].core_hi + period:
            event = events[-1]
            event.core_hi = max(event.core_hi, hi)
        else:
            event = _Event(lo=lo, hi=hi, core_lo=lo, core_hi=hi)
            events.append(event)
        if candidate is not None:
            event.candidates.append(candidate)
    for event in events:
        lo, hi = event.core_lo - period, event.core_hi + period
        if holes.size:
            before = holes[holes[:, 1] <= event.core_lo]
            after = holes[holes[:, 0] >= event.core_hi]
            if before.size:
                lo = max(lo, float(before[:, 1].max()))
            if after.size:
                hi = min(hi, float(after[:, 0].min()))
        event.lo, event.hi = lo, hi
    return events


def _margin(clean: np.ndarray, axis: Axis, edge: float, *, before: bool,
            fence: float) -> tuple[float, float] | None:
    """Up to ``_MARGIN_PERIODS`` clean periods next to the period holding ``edge`` (not past
    ``fence``), as a time interval; None if the period next to it is not clean."""
    p = axis.period_of(edge)
    step = -1 if before else 1
    taken = 0
    q = p + step
    while taken < _MARGIN_PERIODS and 0 <= q < clean.size and clean[q]:
        start = axis.period_start(q)
        if (before and start < fence) or (not before and start + axis.period_s > fence):
            break
        taken += 1
        q += step
    if taken == 0:
        return None
    if before:
        return axis.period_start(p - taken), axis.period_start(p)
    return axis.period_start(p + 1), axis.period_start(p + 1 + taken)


# ------------------------------------------------------------------------------- location


class _Cubic:
    """Cubic Hermite interpolation of one meter's samples (finite-difference tangents):
    values and slopes; error about 1e-6 of the amplitude at 8 kHz, against 2e-4 linear."""

    def __init__(self, t: np.ndarray, v: np.ndarray) -> None:
        self.t, self.v = t, v
        m = np.empty_like(v)
        m[1:-1] = (v[2:] - v[:-2]) / (t[2:] - t[:-2])
        m[0] = (v[1] - v[0]) / (t[1] - t[0])
        m[-1] = (v[-1] - v[-2]) / (t[-1] - t[-2])
        self.m = m

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t, v, m = self.t, self.v, self.m
        k = np.clip(np.searchsorted(t, x, side="right") - 1, 0, t.size - 2)
        h = t[k + 1] - t[k]
        u = (x - t[k]) / h
        u2 = u * u
        value = ((1 + 2 * u) * (1 - u) ** 2 * v[k] + u * (1 - u) ** 2 * h * m[k]
                 + u2 * (3 - 2 * u) * v[k + 1] + u2 * (u - 1) * h * m[k + 1])
        slope = ((6 * u2 - 6 * u) / h * v[k] + (3 * u2 - 4 * u + 1) * m[k]
                 + (6 * u - 6 * u2) / h * v[k + 1] + (3 * u2 - 2 * u) * m[k + 1])
        return value, slope


def _finite(time: np.ndarray, voltage: np.ndarray, lo: float,
            hi: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.searchsorted(time, [lo, hi])
    t = time[a:b]
    v = voltage[a:b].astype(np.float64)
    good = np.isfinite(t) & np.isfinite(v)
    return t[good], v[good]


@dataclass(frozen=True)
class _Model:
    """The meter's samples of one event (times relative to an anchor) against the
    reference under offsets ``d(t)``, with the meter's gain and DC against it."""

    t: np.ndarray
    v: np.ndarray
    cubic: _Cubic
    gain: float
    dc: float
    variance: float
    """Sample variance of the residual on the margins."""
    def residual(self, d: np.ndarray, sel: slice | np.ndarray = slice(None)) -> tuple[
            np.ndarray, np.ndarray]:
        """(meter minus scaled reference at ``t - d``, the reference's slope there); ``d``
        may have a leading axis of hypotheses."""
        value, slope = self.cubic(self.t[sel] - d)
        return self.v[sel] - self.dc - self.gain * value, slope

    def prefix(self, d: np.ndarray) -> np.ndarray:
        """Cumulative squared residual along the last axis: ``out[..., j]`` is the misfit of
        the samples before ``j`` (``d`` as in ``residual``)."""
        r = self.residual(d)[0]
        out = np.zeros(r.shape[:-1] + (r.shape[-1] + 1,))
        np.cumsum(r * r, axis=-1, out=out[..., 1:])
        return out


def _sides(t: np.ndarray, v: np.ndarray, cubic: _Cubic, margins: list[tuple[np.ndarray, _Line]],
           gain: float) -> tuple[list[_Line], float, float, float] | None:
    """Gauss-Newton fit on the margins of the meter's gain and DC and of each side line's
    value (slopes held): (lines, gain, dc, residual variance)."""
    sel = [m for m, _ in margins]
    lines = [line for _, line in margins]
    x = np.concatenate([t[m] for m in sel])
    y = np.concatenate([v[m] for m in sel])
    side = np.concatenate([np.full(int(np.count_nonzero(m)), k) for k, m in enumerate(sel)])
    if x.size < 8 + 2 * len(lines):
        return None
    # Each sample's side line without its value, so that d = shape + values[side].
    shape = np.concatenate([line(t[m]) - line.value for line, m in zip(lines, sel, strict=True)])
    values = np.array([line.value for line in lines])
    dc = 0.0
    for _ in range(_NEWTON_STEPS + 1):
        a, s = cubic(x - shape - values[side])
        r = y - dc - gain * a
        columns = [np.ones_like(x), a] + [np.where(side == k, -gain * s, 0.0)
                                          for k in range(len(lines))]
        design = np.stack(columns)
        step = np.linalg.solve(design @ design.T, design @ r)
        dc += float(step[0])
        gain += float(step[1])
        values = values + step[2:]
        r -= step @ design  # the residual after this step, to first order
        if np.all(np.abs(step[2:]) < 1e-10):
            break
    variance = float(np.sum(r * r)) / max(r.size - 2 - len(lines), 1)
    fitted = [_Line(centre=line.centre, value=float(values[k]), slope=line.slope)
              for k, line in enumerate(lines)]
    return fitted, gain, dc, max(variance, float(np.finfo(np.float64).tiny))


def _model(event: _Event, left: tuple[float, float] | None, right: tuple[float, float] | None,
           meter: Samples, ref: Reference, ref_holes: np.ndarray, prior: Prior, slope: float,
           gain: float) -> tuple[_Model, np.ndarray, _Line | None, _Line | None] | None:
    """The event's samples (span and margins), the fitted side lines and the model; None if
    the samples are too few or the reference does not cover them.  Also returns the
    samples' absolute times."""
    lo = left[0] if left is not None else event.lo
    hi = right[1] if right is not None else event.hi
    stamps, v = _finite(meter.time, meter.voltage, lo, hi)
    if stamps.size < 16:
        return None
    anchor = float(stamps[0])
    t = stamps - anchor
    guess = prior(stamps)
    spacing = float(np.median(np.diff(stamps)))
    reach = _REACH_SAMPLES * spacing
    rt, rv = _finite(ref.time, ref.voltage, float(stamps[0] - guess[0]) - 2 * reach,
                     float(stamps[-1] - guess[-1]) + 2 * reach)
    if rt.size < 16:
        return None
    rt = rt - anchor
    reach += 2.0 * float(np.median(np.diff(rt)))
    # Samples whose reference neighbourhood lies in a hole or past the reference's data
    # cannot be compared under any hypothesis.
    mapped = t - guess
    usable = (mapped - reach > rt[0]) & (mapped + reach < rt[-1])
    for a, b in ref_holes - anchor:
        usable &= ~((mapped > a - reach) & (mapped < b + reach))
    if np.count_nonzero(usable) < 16:
        return None
    stamps, t, v, guess = stamps[usable], t[usable], v[usable], guess[usable]
    cubic = _Cubic(rt, rv)
    margins: list[tuple[np.ndarray, _Line] | None] = []
    for interval in (left, right):
        if interval is None:
            margins.append(None)
            continue
        sel = (stamps >= interval[0]) & (stamps < interval[1])
        centre = 0.5 * (interval[0] + interval[1]) - anchor
        value = float(np.interp(centre, t, guess)) if sel.any() else math.nan
        margins.append((sel, _Line(centre=centre, value=value, slope=slope))
                       if sel.any() else None)
    known = [m for m in margins if m is not None]
    if not known:
        return None
    fit = _sides(t, v, cubic, known, gain)
    if fit is None:
        return None
    lines, gain, dc, variance = fit
    it = iter(lines)
    left_line = next(it) if margins[0] is not None else None
    right_line = next(it) if margins[1] is not None else None
    # The margins fixed the sides; the changes are sought between them.
    inner = np.ones(t.size, dtype=bool)
    for margin in margins:
        if margin is not None:
            inner &= ~margin[0]
    if np.count_nonzero(inner) < 4:
        return None
    model = _Model(t=t[inner], v=v[inner], cubic=cubic, gain=gain, dc=dc, variance=variance)
    return model, stamps[inner], left_line, right_line


def _locate(event: _Event, left_margin: tuple[float, float] | None,
            right_margin: tuple[float, float] | None, meter: Samples, ref: Reference,
            ref_holes: np.ndarray, prior: Prior, slope: float, gain: float,
            min_step_s: float) -> tuple[list[Change], int] | None:
    """The changes inside ``event`` and whether a middle stretch was found; None when the
    samples cannot decide."""
    built = _model(event, left_margin, right_margin, meter, ref, ref_holes, prior, slope, gain)
    if built is None:
        return None
    model, stamps, left, right = built
    t = model.t
    base_line = left if left is not None else right
    assert base_line is not None
    base = base_line(t)
    limit = _UNEXPLAINED_SIGMAS**2 * model.variance
    unexplained = np.ones(t.size, dtype=bool)
    before = after = None
    if left is not None:
        r = model.residual(left(t))[0]
        unexplained &= r * r > limit
        before = np.concatenate(([0.0], np.cumsum(r * r)))
    if right is not None:
        r = model.residual(right(t))[0]
        unexplained &= r * r > limit
        after = np.concatenate(([0.0], np.cumsum(r * r)))
    middle = _middle(model, base, before, after, unexplained)
    enough = STEP_SIGMAS**2 * model.variance

    def offset(line: _Line, j: int, shift: float = 0.0) -> float:
        return float(line(t[min(j, t.size - 1):][:1])[0]) + shift

    if before is not None and after is not None and left is not None and right is not None:
        step = before + (after[-1] - after)
        j = int(np.argmin(step))
        if middle is not None and step[j] - middle[0] > enough:
            _, a, b, h = middle
            edges = (_edge(stamps, a, offset(left, a), offset(left, a, h), min_step_s)
                     + _edge(stamps, b, offset(left, b, h), offset(right, b), min_step_s))
            return edges, 1
        if min(float(before[-1]), float(after[-1])) - step[j] > enough:
            return _edge(stamps, j, offset(left, j), offset(right, j), min_step_s), 0
        return [], 0
    # One side unknown: the middle runs to that side's end of the samples.
    known = before if before is not None else after
    assert known is not None
    if middle is None or float(known[-1]) - middle[0] <= enough:
        return [], 0
    _, a, b, h = middle
    if left is not None:
        return _edge(stamps, a, offset(left, a), offset(left, a, h), min_step_s), 1
    assert right is not None
    return _edge(stamps, b, offset(right, b, h), offset(right, b), min_step_s), 1


def _segment(left: np.ndarray | None, right: np.ndarray | None,
             middle: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best change points per trial: samples ``[0, j0)`` under the left hypothesis,
    ``[j0, j1)`` under the middle (one row of ``middle`` per trial), ``[j1, n)`` under the
    right.  Arguments are prefix misfits (``_Model.prefix``); an unknown side (None) forces
    the middle to reach that end.  Returns (misfit, j0, j1) per trial."""
    rows, size = middle.shape
    if left is not None:
        a = left[None, :] - middle
    else:
        a = np.full((rows, size), np.inf)
        a[:, 0] = 0.0
    if right is not None:
        b = middle + (right[-1] - right)[None, :]
    else:
        b = np.full((rows, size), np.inf)
        b[:, -1] = middle[:, -1]
    running = np.minimum.accumulate(a, axis=1)
    total = running + b
    j1 = np.argmin(total, axis=1)
    # Where each row's running minimum was last reached: the best j0 for every j1.
    columns = np.arange(size)
    where = np.maximum.accumulate(np.where(a <= running, columns[None, :], 0), axis=1)
    rows_ = np.arange(rows)
    return total[rows_, j1], where[rows_, j1], j1


def _refine(model: _Model, base: np.ndarray, h: float, a: int, b: int) -> float:
    """Gauss-Newton for the middle offset ``h`` on samples ``[a, b)``."""
    for _ in range(_NEWTON_STEPS):
        r, s = model.residual(base[a:b] + h, slice(a, b))
        weight = float(np.sum(s * s))
        if not weight > 0:
            break
        h -= float(np.sum(r * s)) / (model.gain * weight)
    return h


def _middle(model: _Model, base: np.ndarray, left: np.ndarray | None,
            right: np.ndarray | None, unexplained: np.ndarray) -> tuple[
                float, int, int, float] | None:
    """The best middle stretch (misfit, j0, j1, offset against ``base``); None without one.

    It starts from the offset the samples neither side explains point to, and alternates
    the change points with Gauss-Newton on the stretch's inner samples: an end sample may
    have been taken while only one meter had jumped (the other skipped that instant) and
    fits no hypothesis.
    """
    if not unexplained.any():
        return None
    r, s = model.residual(base[unexplained], unexplained)
    weight = float(np.sum(s * s))
    if not weight > 0:
        return None
    h = -float(np.sum(r * s)) / (model.gain * weight)
    best: tuple[float, int, int, float] | None = None
    a = b = -1
    for _ in range(4):
        c, new0, new1 = _segment(left, right, model.prefix(base + h)[None, :])
        if not new1[0] > new0[0]:
            break
        best = (float(c[0]), int(new0[0]), int(new1[0]), h)
        if (best[1], best[2]) == (a, b):
            break
        a, b = best[1], best[2]
        inner = (a + 1, b - 1) if b - a >= 3 else (a, b)
        h = _refine(model, base, h, *inner)
    return best


def _edge(t: np.ndarray, j: int, before: float, after: float, min_step_s: float) -> list[Change]:
    """A change between samples ``j - 1`` and ``j``, if it is inside the samples and at
    least ``min_step_s``."""
    size = after - before
    if not 0 < j < t.size or abs(size) < min_step_s:
        return []
    return [Change(interval=(float(t[j - 1]), float(t[j])), size=size, located=True)]
