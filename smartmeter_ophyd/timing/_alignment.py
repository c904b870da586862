"""Post-hoc alignment of meters on the same phase, from their recorded voltage waveforms.

Intent
------
Two meters on one phase see the same voltage.  If meter ``m`` stamps an instant ``t_m`` and
the reference stamps the same instant ``t_r``, then ``v_m(t) = v_r(t - d)`` with the residual
offset ``d = t_m - t_r``.  ``align`` estimates ``d`` per window (default 1 s) and
``apply_alignment`` maps the meter's time axis onto the reference's: ``t - d(t)``.

Method (all vectorised: one pass over each meter's samples for the blocks, one for the
misfit, one strided pass for the correlation):

1. **Blocks.** Each meter's samples are cut into blocks (default 0.1 s = 5 mains periods) on
   one grid, and the fundamental of each block is demodulated with a Hann taper on the
   samples' own time stamps (``_blocks``).  The cross-spectral phase of the two meters at the
   fundamental, ``arg(z_m conj(z_r))``, is where the cross-correlation of their fundamentals
   peaks: ``d_b = -arg(z_m conj(z_r)) / (2 pi f_b)``, with the local mains frequency ``f_b``
   taken from the reference's phase progression.  The answer is unambiguous only within
   +-half a mains period (+-10 ms at 50 Hz): the callers' time axes must already agree to
   that (NTP does).  The estimate is sub-sample by construction (a phase, not a lag index).
2. **Continuity.** Within runs of consecutive usable blocks ``d_b`` is unwrapped, so a run
   never jumps by a period; each run is folded to lie within +-half a period.
3. **Steps.** ``d`` jumps wherever either meter's stored time jumps: a duplicated or
   dropped sample (§6.5 corrections, §4.10 fillers and drops: one sample), an RTC restart
   or a refused sample (any fraction of a sample: the time model's ``placement_s``).  Two
   meters whose stored times jump at the same stamp make an *excursion*: ``d`` jumps and
   jumps back ``|d|`` later, invisible to blocks on the stamps.  Candidates come from the
   detrended block-to-block differences and from the per-period misfit of the meter's
   samples against the reference at the same instant (``_misfit``); each is located to the
   sample on the waveforms (``_steps``: the offset before, after, and of a middle stretch)
   and becomes a *break*, down to ``min_step_s``, also next to the data's ends and holes.
   Gaps in either meter's data (holes, NaN samples) are breaks too (the reference's moved
   onto the meter's time).  Blocks holding a break are left out; no estimate spans one.
4. **Windows.** In each window and each stretch between breaks (a *piece*), a straight
   line ``d(t) = offset + drift (t - mid)`` is fitted to the block offsets, so the clocks'
   relative drift (100 us/s at +-50 ppm) is followed inside a window.
5. **Uncertainty.** The expanded uncertainty aims at 99 % coverage: the larger of the
   window's own scatter (Student's t on its degrees of freedom) and the scatter pooled over
   the whole pair (normal quantile), plus the float64 spacing of the time stamps (about
   0.24 us for unix times now): each of the two stamps of one instant is rounded by up to
   half of it, so the offset between the axes at an instant is defined only to that bound.
6. **Quality.** ``correlation`` is the Pearson correlation of the meter's samples with the
   reference interpolated at ``t - d(t)``: it is near 1 - 1e-6 for a good fit, and drops for
   a different phase, a wrong branch or a bad piece.

Limits
------
* Same phase only (voltage, never current).  In a balanced grid L2 is L1 delayed by a
  third of a period, harmonics included, so a meter on the wrong phase reads as a 6.7 ms
  offset with a perfect ``correlation``: only the wiring can tell.  ``correlation`` does
  reveal a different signal (a current channel, a corrupted stretch).
* Needs at least 8 samples per mains period (rate >= 400 Hz uniform, or the dense part of
  bursty rates such as 640..6400); below 800 Hz harmonics can alias onto the fundamental
  and bias ``d`` by tens of microseconds without any sign in the uncertainty.
* Steps smaller than ``min_step_s`` (or than ten times the block noise) are not located;
  they widen the window's scatter instead.  A located step is placed within about one
  sample; the samples between the true and the located position get the wrong side.  At
  most two changes are located within one event (tens of milliseconds); see ``_steps``.
* Offsets are reported where there are usable blocks.  ``offset_at`` extends each piece's
  line up to the next break and returns NaN in a stretch between breaks with no piece
  (fewer than ``min_blocks`` blocks: inside an excursion, or between a step and the data's
  end).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ._blocks import CHUNK, BlockPhasors, block_phasors, median_spacing
from ._misfit import Reference, period_misfit
from ._stats import COVERAGE_Z, student_t_99
from ._steps import Axis, Change, Changes, OffsetSeries, Samples, find_changes

__all__ = ["Aligner", "Alignment", "AlignmentError", "Waveform", "align", "align_pair",
           "apply_alignment"]

logger = logging.getLogger(__name__)

MIN_SAMPLES_PER_PERIOD: Final = 8
_CORRELATION_SAMPLES: Final = 2000
"""Samples per window the quality figure is computed on."""


class AlignmentError(ValueError):
    """Input that cannot be aligned; the message names the meter and the problem."""


@dataclass(frozen=True)
class Waveform:
    """One meter's recorded voltage on one phase and its absolute time axis.

    ``time`` is float64 unix seconds (the meter's time model, never host receive times),
    strictly increasing where finite; may be irregular (bursty rates) and have gaps (missing
    samples, or NaN in ``time`` or ``voltage``).  ``voltage`` is 1-D float32 or float64.
    """

    name: str
    time: np.ndarray
    voltage: np.ndarray
    _first: float = field(default=math.nan, init=False, repr=False, compare=False)
    _last: float = field(default=math.nan, init=False, repr=False, compare=False)
    _spacing: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        time = np.asarray(self.time)
        voltage = np.asarray(self.voltage)
        if time.ndim != 1 or voltage.ndim != 1:
            raise AlignmentError(
                f"meter {self.name!r}: time and voltage must be 1-D, not shapes "
                f"{time.shape} and {voltage.shape}")
        if time.shape != voltage.shape:
            raise AlignmentError(
                f"meter {self.name!r}: {time.shape[0]} times for {voltage.shape[0]} samples")
        if time.dtype != np.float64:
            raise AlignmentError(
                f"meter {self.name!r}: time must be float64 unix seconds, not {time.dtype}")
        if voltage.dtype not in (np.float32, np.float64):
            raise AlignmentError(
                f"meter {self.name!r}: voltage must be float32 or float64, not {voltage.dtype}")
        first, last = _check_increasing(self.name, time)
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "voltage", voltage)
        object.__setattr__(self, "_first", first)
        object.__setattr__(self, "_last", last)

    @property
    def span(self) -> tuple[float, float]:
        """(first, last) finite time."""
        return self._first, self._last

    @property
    def spacing(self) -> float:
        """Median positive spacing of the finite times (computed once)."""
        if self._spacing is None:
            object.__setattr__(self, "_spacing", median_spacing(self.time))
        assert self._spacing is not None
        return self._spacing


def _check_increasing(name: str, time: np.ndarray) -> tuple[float, float]:
    """(first, last) finite time; raises unless finite times strictly increase."""
    previous = -math.inf
    first = math.nan
    for lo in range(0, time.shape[0], CHUNK):
        chunk = time[lo:lo + CHUNK]
        finite = np.isfinite(chunk)
        where = np.flatnonzero(finite) if not finite.all() else None
        values = chunk if where is None else chunk[where]
        if values.size == 0:
            continue
        if math.isnan(first):
            first = float(values[0])
        if values[0] <= previous:
            bad = np.zeros(1, dtype=np.int64)
        else:
            bad = np.flatnonzero(values[1:] <= values[:-1]) + 1
        if bad.size:
            at = lo + int(bad[0] if where is None else where[bad[0]])
            raise AlignmentError(
                f"meter {name!r}: time axis is not strictly increasing at sample {at} "
                f"({float(time[at])!r} after {previous if bad[0] == 0 else float(values[bad[0] - 1])!r})")
        previous = float(values[-1])
    if math.isnan(first) or first == previous:
        raise AlignmentError(f"meter {name!r}: fewer than two samples with finite times")
    return first, previous


@dataclass(frozen=True)
class Alignment:
    """Residual offset of ``meter`` against ``reference``, one row per window piece.

    A piece is a window (``window_s``) or the part of it between two breaks.  All arrays
    have one entry per piece, in time order.  ``offset_s`` is ``t_meter - t_reference`` for
    the same instant, at the piece's midpoint, in the meter's time; subtract it to align.
    """

    meter: str
    reference: str
    window_start: np.ndarray
    """float64: start of the piece (meter time, unix s)."""
    window_end: np.ndarray
    """float64: end of the piece."""
    offset_s: np.ndarray
    """float64: offset at ``(window_start + window_end) / 2``."""
    drift: np.ndarray
    """float64: slope of the offset inside the piece (s per s; 1e-4 = 100 ppm)."""
    uncertainty_s: np.ndarray
    """float64: expanded uncertainty of ``offset_s`` (aims at 99 % coverage)."""
    correlation: np.ndarray
    """float64: Pearson correlation of the aligned waveforms over the piece."""
    n_samples: np.ndarray
    """int64: meter samples inside the piece."""
    n_blocks: np.ndarray
    """int64: blocks the fit used."""
    breaks: np.ndarray
    """float64 (k, 2): intervals where continuity is not assumed (gaps and steps)."""
    break_step_s: np.ndarray
    """float64 (k,): size of each step break (meter minus reference after the step, minus
    before); NaN for gaps."""
    mains_hz: float
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.offset_s.shape[0])

    def offset_at(self, time: np.ndarray | float) -> np.ndarray:
        """Offset (s) at meter times ``time``: each piece's line inside it, linear between
        neighbouring pieces, each piece's line up to the break that ends its stretch; NaN
        in a stretch between breaks that has no piece."""
        t = np.atleast_1d(np.asarray(time, dtype=np.float64))
        out = np.full(t.shape, np.nan)
        if len(self) == 0:
            return out
        start, end = self.window_start, self.window_end
        mid = 0.5 * (start + end)
        cuts = np.sort(0.5 * (self.breaks[:, 0] + self.breaks[:, 1]))
        piece_segment = np.searchsorted(cuts, mid, side="right")
        segment = np.searchsorted(cuts, t, side="right")
        lo = np.searchsorted(piece_segment, segment, side="left")
        hi = np.searchsorted(piece_segment, segment, side="right")
        covered = hi > lo
        i = np.searchsorted(start, t, side="right") - 1
        i = np.clip(i, lo, np.maximum(hi - 1, lo))
        i = np.where(covered, i, 0)
        own = self.offset_s[i] + self.drift[i] * (t - mid[i])
        nxt = np.minimum(i + 1, len(self) - 1)
        between = covered & (t > end[i]) & (i + 1 < hi)
        if between.any():
            left = self.offset_s[i] + self.drift[i] * (end[i] - mid[i])
            right = self.offset_s[nxt] + self.drift[nxt] * (start[nxt] - mid[nxt])
            span = start[nxt] - end[i]
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(span > 0, (t - end[i]) / span, 1.0)
            own = np.where(between, left + frac * (right - left), own)
        out[covered] = own[covered]
        return out


def apply_alignment(time: np.ndarray, alignment: Alignment) -> np.ndarray:
    """The meter's time axis ``time`` expressed on the reference's axis: ``t - d(t)``.

    NaN where the alignment has no estimate for the stretch (see ``Alignment.offset_at``).
    """
    t = np.asarray(time, dtype=np.float64)
    out = np.empty_like(t)
    for lo in range(0, t.shape[0], CHUNK):
        chunk = t[lo:lo + CHUNK]
        out[lo:lo + CHUNK] = chunk - alignment.offset_at(chunk)
    return out


# ---------------------------------------------------------------------------------- public


def align(
    waveforms: Mapping[str, Waveform] | list[Waveform] | tuple[Waveform, ...],
    reference: str,
    *,
    window_s: float = 1.0,
    block_s: float = 0.1,
    mains_hz: float = 50.0,
    min_blocks: int = 3,
    min_step_s: float = 2e-6,
) -> dict[str, Alignment]:
    """Align every meter in ``waveforms`` against the one named ``reference``.

    Returns one ``Alignment`` per other meter.  See the module docstring for the method and
    its limits; ``align_pair`` documents the parameters.
    """
    items = dict(waveforms) if isinstance(waveforms, Mapping) else {w.name: w for w in waveforms}
    if reference not in items:
        raise AlignmentError(
            f"reference meter {reference!r} is not among the waveforms {sorted(items)}")
    ref = items[reference]
    others = [w for name, w in items.items() if name != reference]
    if not others:
        raise AlignmentError(f"nothing to align: only the reference {reference!r} was given")
    _Grid.spanning(0.0, 1.0, [], window_s=window_s, block_s=block_s, mains_hz=mains_hz)
    for w in others:  # every meter's check before the work, so a bad one fails early
        _Grid.check_spacing(w, mains_hz)
    span = (min(w._first for w in items.values()), max(w._last for w in items.values()))
    aligner = Aligner(ref, span, window_s=window_s, block_s=block_s, mains_hz=mains_hz,
                      min_blocks=min_blocks, min_step_s=min_step_s)
    return {w.name: aligner(w, check=False) for w in others}


class Aligner:
    """``align`` one meter at a time: memory holds the reference and one meter, not all.

    ``span`` is ``(earliest, latest)`` finite time over *every* meter that will be aligned
    (and the reference): the windows lie on whole seconds of the earliest, so results equal
    ``align``'s over the same meters.  Each call checks and aligns one meter.
    """

    def __init__(
        self,
        reference: Waveform,
        span: tuple[float, float],
        *,
        window_s: float = 1.0,
        block_s: float = 0.1,
        mains_hz: float = 50.0,
        min_blocks: int = 3,
        min_step_s: float = 2e-6,
    ) -> None:
        first, last = float(span[0]), float(span[1])
        if not (math.isfinite(first) and math.isfinite(last) and first <= reference._first
                and reference._last <= last):
            raise AlignmentError(
                f"span {span!r} does not cover the reference {reference.name!r} "
                f"({reference._first!r} .. {reference._last!r})")
        self.reference = reference
        self.grid = _Grid.spanning(first, last, [reference], window_s=window_s,
                                   block_s=block_s, mains_hz=mains_hz)
        self.min_blocks, self.min_step_s = min_blocks, min_step_s
        self._first, self._last = first, last
        self._ref_blocks = self.grid.phasors(reference)
        self._samples = Reference.of(reference.time, reference.voltage)
        self._frequency = _reference_frequency(self._ref_blocks, self.grid)

    @property
    def span(self) -> tuple[float, float]:
        """The ``span`` it was built for: every meter it aligns must lie inside."""
        return self._first, self._last

    def __call__(self, meter: Waveform, *, check: bool = True) -> Alignment:
        """``meter`` against the reference (``check=False``: its sample spacing was checked)."""
        if meter.name == self.reference.name:
            raise AlignmentError(f"meter {meter.name!r} is the reference")
        if not (self._first <= meter._first and meter._last <= self._last):
            raise AlignmentError(
                f"meter {meter.name!r}: its samples ({meter._first!r} .. {meter._last!r}) lie "
                f"outside the span the aligner was built for ({self._first!r} .. "
                f"{self._last!r})")
        if check:
            _Grid.check_spacing(meter, self.grid.mains_hz)
        grid = self.grid
        return _align_blocks(meter, self.reference, self._samples, grid.phasors(meter),
                             self._ref_blocks, self._frequency, grid,
                             min_blocks=self.min_blocks, min_step_s=self.min_step_s)


def align_pair(
    meter: Waveform,
    reference: Waveform,
    *,
    window_s: float = 1.0,
    block_s: float = 0.1,
    mains_hz: float = 50.0,
    min_blocks: int = 3,
    min_step_s: float = 2e-6,
) -> Alignment:
    """Residual offset of ``meter`` against ``reference`` per window.

    ``window_s`` must be a whole number of blocks ``block_s``; blocks should span at least
    five mains periods (the Hann taper's harmonic rejection).  Windows lie on whole seconds
    of the earliest sample.  A piece with fewer than ``min_blocks`` usable blocks gets no
    row.  ``min_step_s`` is the smallest offset step that is located and made a break.
    """
    return align({meter.name: meter, reference.name: reference}, reference.name,
                 window_s=window_s, block_s=block_s, mains_hz=mains_hz,
                 min_blocks=min_blocks, min_step_s=min_step_s)[meter.name]


# ---------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class _Grid:
    origin: float
    window_s: float
    block_s: float
    blocks_per_window: int
    n_blocks: int
    mains_hz: float

    @staticmethod
    def check_spacing(w: Waveform, mains_hz: float) -> None:
        spacing = w.spacing
        if not spacing <= 1.0 / (MIN_SAMPLES_PER_PERIOD * mains_hz):
            raise AlignmentError(
                f"meter {w.name!r}: median sample spacing {spacing * 1e3:.3f} ms is too "
                f"coarse to align on the waveform: needs at least "
                f"{MIN_SAMPLES_PER_PERIOD} samples per mains period "
                f"(spacing <= {1e3 / (MIN_SAMPLES_PER_PERIOD * mains_hz):.3f} ms)")

    @classmethod
    def spanning(cls, first: float, last: float, checked: list[Waveform], *, window_s: float,
                 block_s: float, mains_hz: float) -> _Grid:
        """The grid over ``[first, last]``; ``checked`` meters' spacing is checked."""
        if not 40.0 <= mains_hz <= 70.0:
            raise AlignmentError(f"mains_hz {mains_hz} is not a mains frequency (40..70 Hz)")
        if not block_s >= 4.0 / mains_hz:
            raise AlignmentError(
                f"block_s {block_s} s is shorter than four mains periods ({4 / mains_hz} s)")
        per_window = round(window_s / block_s)
        if per_window < 1 or abs(per_window * block_s - window_s) > 1e-9 * window_s:
            raise AlignmentError(
                f"window_s {window_s} s is not a whole number of blocks of {block_s} s")
        for w in checked:
            cls.check_spacing(w, mains_hz)
        origin = float(math.floor(first))
        n_blocks = int(math.floor((last - origin) / block_s)) + 1
        n_blocks = -(-n_blocks // per_window) * per_window
        return cls(origin=origin, window_s=window_s, block_s=block_s,
                   blocks_per_window=per_window, n_blocks=n_blocks, mains_hz=mains_hz)

    @property
    def centres(self) -> np.ndarray:
        return self.origin + (np.arange(self.n_blocks) + 0.5) * self.block_s

    def block_start(self, index: np.ndarray | int) -> np.ndarray:
        return self.origin + np.asarray(index, dtype=np.float64) * self.block_s

    @property
    def axis(self) -> Axis:
        return Axis(origin=self.origin, block_s=self.block_s, period_s=1.0 / self.mains_hz)

    @property
    def n_periods(self) -> int:
        return int(math.ceil(self.n_blocks * self.block_s * self.mains_hz))

    def phasors(self, wave: Waveform) -> BlockPhasors:
        return block_phasors(wave.time, wave.voltage, origin=self.origin, block_s=self.block_s,
                             n_blocks=self.n_blocks, mains_hz=self.mains_hz,
                             spacing=wave.spacing)


def _wrap(phase: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * phase))


def _reference_frequency(ref: BlockPhasors, grid: _Grid) -> np.ndarray:
    """Mains frequency per block from the reference's phase advance (NaN if isolated)."""
    angle = np.angle(ref.phasor)
    both = ref.valid[1:] & ref.valid[:-1]
    forward = np.where(both, _wrap(angle[1:] - angle[:-1]), np.nan)
    pair = np.full((2, grid.n_blocks), np.nan)
    pair[0, :-1] = forward
    pair[1, 1:] = forward
    count = np.sum(np.isfinite(pair), axis=0)
    total = np.nansum(pair, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        advance = np.where(count > 0, total / count, np.nan)
    return grid.mains_hz + advance / (2.0 * math.pi * grid.block_s)


# ---------------------------------------------------------------------------------- pair


def _offsets(meter: np.ndarray, ref: np.ndarray, usable: np.ndarray,
             frequency: np.ndarray) -> OffsetSeries:
    """Offsets of usable cells from the phasors' cross phase at the local mains frequency."""
    index = np.flatnonzero(usable & np.isfinite(frequency))
    cross = meter[index] * np.conj(ref[index])
    period = 1.0 / frequency[index]
    cycles = -np.angle(cross) / (2.0 * math.pi)
    run = np.concatenate(([0], np.cumsum(np.diff(index) > 1))) if index.size else index
    if index.size:
        # Unwrap in whole mains cycles inside runs (consecutive blocks never differ by half
        # a period), then fold each run's mean into +-half a cycle.  Whole cycles, not
        # seconds: a cycle's length follows the mains frequency from block to block.
        same = run[1:] == run[:-1]
        turns = np.where(same, np.rint(np.diff(cycles)), 0.0)
        cycles = cycles - np.concatenate(([0.0], np.cumsum(turns)))
        mean = np.bincount(run, weights=cycles) / np.bincount(run)
        cycles = cycles - np.rint(mean)[run]
    return OffsetSeries(index=index, offset=cycles * period, period=period, run=run)


def _block_offsets(meter: BlockPhasors, ref: BlockPhasors, frequency: np.ndarray) -> OffsetSeries:
    return _offsets(meter.phasor, ref.phasor, meter.valid & ref.valid, frequency)


def _align_blocks(meter: Waveform, ref: Waveform, samples: Reference,
                  meter_blocks: BlockPhasors, ref_blocks: BlockPhasors, frequency: np.ndarray,
                  grid: _Grid, *, min_blocks: int, min_step_s: float) -> Alignment:
    notes: list[str] = []
    runs = _block_offsets(meter_blocks, ref_blocks, frequency)
    gaps = np.concatenate([meter_blocks.holes, _in_meter_time(ref_blocks.holes, runs, grid)])
    gaps = gaps[np.argsort(gaps[:, 0], kind="stable")]
    found = _changes(meter, samples, meter_blocks, ref_blocks, runs, gaps, grid, min_step_s)
    steps = found.changes
    keep = ~_straddled(steps, grid)[runs.index]
    index, offset = runs.index[keep], runs.offset[keep]

    breaks = np.concatenate([gaps, np.array([s.interval for s in steps]).reshape(-1, 2)])
    step_size = np.concatenate([np.full(gaps.shape[0], np.nan), [s.size for s in steps]])
    order = np.argsort(0.5 * (breaks[:, 0] + breaks[:, 1]), kind="stable")
    breaks, step_size = breaks[order], step_size[order]
    cuts = 0.5 * (breaks[:, 0] + breaks[:, 1])

    centres = grid.centres[index]
    segment = np.searchsorted(cuts, centres, side="right")
    window = index // grid.blocks_per_window
    key = window * (cuts.size + 1) + segment
    pieces, piece_of = np.unique(key, return_inverse=True)
    n_blocks = np.bincount(piece_of, minlength=pieces.size)
    enough = n_blocks >= min_blocks
    if not enough.all():
        notes.append(f"{int(np.count_nonzero(~enough))} window pieces with fewer than "
                     f"{min_blocks} usable blocks have no estimate")
    piece_window = pieces // (cuts.size + 1)
    piece_segment = pieces % (cuts.size + 1)
    w_start = grid.origin + piece_window * grid.window_s
    w_end = w_start + grid.window_s
    # Segment s lies between break s - 1 and break s.
    start = np.maximum(w_start, np.concatenate(([-np.inf], breaks[:, 1]))[piece_segment])
    end = np.minimum(w_end, np.concatenate((breaks[:, 0], [np.inf]))[piece_segment])
    mid = 0.5 * (start + end)

    fit = _fit_lines(centres - mid[piece_of], offset, piece_of, pieces.size)
    intercept, slope, ss, dof, var_factor = fit
    pooled_dof = float(np.sum(dof[enough & (dof > 0)]))
    pooled_var = float(np.sum(ss[enough & (dof > 0)])) / pooled_dof if pooled_dof > 0 else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        own = student_t_99(dof) * np.sqrt(np.where(dof > 0, ss / dof, np.inf) * var_factor)
    pooled = COVERAGE_Z * np.sqrt(pooled_var * var_factor) if pooled_dof > 0 else np.inf
    if not pooled_dof > 0:
        notes.append("no window had spare blocks to estimate the scatter: uncertainty unknown")
    # Each of the two stamps of one instant is rounded by up to half the float64 spacing, so
    # their difference is only defined to one spacing: a bound, added linearly.
    resolution = np.spacing(np.maximum(np.abs(start), np.abs(end)))
    statistical = np.where(dof > 0, np.maximum(own, pooled), pooled)
    uncertainty = statistical + resolution
    notes.extend(_change_notes(found))
    if gaps.size:
        notes.append(f"{gaps.shape[0]} gaps in the data break the alignment")
    # Slope is per second: the fit runs on seconds.
    result = Alignment(
        meter=meter.name, reference=ref.name,
        window_start=start[enough], window_end=end[enough],
        offset_s=intercept[enough], drift=slope[enough],
        uncertainty_s=uncertainty[enough],
        correlation=np.zeros(int(np.count_nonzero(enough))),
        n_samples=np.zeros(int(np.count_nonzero(enough)), dtype=np.int64),
        n_blocks=n_blocks[enough].astype(np.int64),
        breaks=breaks, break_step_s=step_size, mains_hz=grid.mains_hz, notes=tuple(notes))
    correlation, n_samples = _correlation(result, meter, ref, ref_blocks.holes,
                                          grid.window_s / meter_blocks.spacing)
    object.__setattr__(result, "correlation", correlation)
    object.__setattr__(result, "n_samples", n_samples)
    logger.debug("aligned %s on %s: %d pieces, %d steps, %d gaps", meter.name, ref.name,
                 len(result), len(steps), gaps.shape[0])
    return result


def _changes(meter: Waveform, ref: Reference, meter_blocks: BlockPhasors,
             ref_blocks: BlockPhasors, runs: OffsetSeries, gaps: np.ndarray, grid: _Grid,
             min_step_s: float) -> Changes:
    """Steps and excursions of the offset (``_steps``), judged with the per-period misfit of
    the meter against the reference under the block offsets (``_misfit``)."""
    if runs.index.size == 0:
        return find_changes(runs, grid.axis, np.full(grid.n_periods, np.nan),
                            Samples(meter.time, meter.voltage), ref, ref_blocks.holes, gaps,
                            gain=1.0, misfit_floor=math.inf, min_step_s=min_step_s)
    amplitude = np.abs(ref_blocks.phasor[runs.index])
    gain = float(np.median(np.abs(meter_blocks.phasor[runs.index]) / amplitude))
    misfit = period_misfit(meter.time, meter.voltage, ref,
                           knots=grid.centres[runs.index], offsets=runs.offset, gain=gain,
                           origin=grid.origin, period_s=1.0 / grid.mains_hz,
                           n_periods=grid.n_periods, gaps=gaps)
    # A misfit far below what a step of min_step_s adds is float noise, not a change.
    rms = math.sqrt(2.0) * float(np.median(amplitude))
    floor = 0.01 * (2.0 * math.pi * grid.mains_hz * rms * min_step_s) ** 2
    return find_changes(runs, grid.axis, misfit, Samples(meter.time, meter.voltage), ref,
                        ref_blocks.holes, gaps, gain=gain, misfit_floor=floor,
                        min_step_s=min_step_s)


def _in_meter_time(holes: np.ndarray, blocks: OffsetSeries, grid: _Grid) -> np.ndarray:
    """The reference's holes on the meter's time axis (moved by the block offsets)."""
    if holes.size == 0 or blocks.index.size == 0:
        return holes.reshape(-1, 2)
    knots = grid.centres[blocks.index] - blocks.offset
    return np.asarray(holes + np.interp(holes, knots, blocks.offset))


def _straddled(changes: list[Change], grid: _Grid) -> np.ndarray:
    """Blocks holding a change (their phasor mixes both sides): left out of the fits."""
    out = np.zeros(grid.n_blocks, dtype=bool)
    for change in changes:
        lo, hi = np.floor((np.asarray(change.interval) - grid.origin) / grid.block_s)
        out[max(int(lo), 0):min(int(hi), grid.n_blocks - 1) + 1] = True
    return out


def _change_notes(found: Changes) -> list[str]:
    notes = []
    located = sum(1 for c in found.changes if c.located)
    if located:
        notes.append(f"{located} offset steps located (stored-time jumps of either meter: "
                     "duplicated, dropped or refused samples, RTC restarts)")
    if found.excursions:
        notes.append(f"{found.excursions} of them bound short excursions (both meters' "
                     "jumps nearly coincide)")
    if len(found.changes) > located:
        notes.append(f"{len(found.changes) - located} offset steps could not be located "
                     "to the sample: their blocks are breaks")
    if math.isfinite(found.block_noise):
        notes.append(f"block-to-block offset noise {found.block_noise * 1e9:.0f} ns")
    return notes


def _fit_lines(x: np.ndarray, y: np.ndarray, group: np.ndarray, n: int) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group least-squares lines ``y = a + b x``: (a, b, residual SS, dof, var(a)/sigma^2).

    ``a`` is the value at ``x = 0`` (the piece midpoint).  Groups with one point get b = 0.
    """
    s0 = np.bincount(group, minlength=n).astype(np.float64)
    sx = np.bincount(group, weights=x, minlength=n)
    sy = np.bincount(group, weights=y, minlength=n)
    xm, ym = sx / s0, sy / s0
    dx = x - xm[group]
    dy = y - ym[group]
    sxx = np.bincount(group, weights=dx * dx, minlength=n)
    sxy = np.bincount(group, weights=dx * dy, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, sxy / sxx, 0.0)
    intercept = ym - slope * xm
    resid = dy - slope[group] * dx
    ss = np.bincount(group, weights=resid * resid, minlength=n)
    dof = np.maximum(s0 - np.where(sxx > 0, 2, 1), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_factor = 1.0 / s0 + np.where(sxx > 0, xm * xm / sxx, 0.0)
    return intercept, slope, ss, dof, var_factor


def _correlation(result: Alignment, meter: Waveform, ref: Waveform,
                 ref_holes: np.ndarray, samples_per_window: float) -> tuple[np.ndarray, np.ndarray]:
    """Per piece: Pearson correlation of meter samples with the reference at ``t - d(t)``,
    and the number of meter samples inside the piece.

    The correlation uses every k-th sample (about ``_CORRELATION_SAMPLES`` per window: it is
    a quality figure, not an estimate) whose mapped time falls inside the reference's data.
    """
    n = len(result)
    sums = np.zeros((6, n))
    count = np.zeros(n, dtype=np.int64)
    if n == 0:
        return np.zeros(0), count
    stride = max(1, int(samples_per_window // _CORRELATION_SAMPLES))
    rt, rv = ref.time, ref.voltage
    if not (np.isfinite(rt).all() and np.isfinite(rv).all()):
        good = np.isfinite(rt) & np.isfinite(rv)
        rt, rv = rt[good], rv[good]
    holes = ref_holes[np.argsort(ref_holes[:, 0])] if ref_holes.size else ref_holes
    mid = 0.5 * (result.window_start + result.window_end)
    chunk = CHUNK - CHUNK % stride
    for lo in range(0, meter.time.shape[0], chunk):
        t = meter.time[lo:lo + chunk]
        v = meter.voltage[lo:lo + chunk]
        good = np.isfinite(t) & np.isfinite(v)
        if not good.all():
            t, v = t[good], v[good]
        if t.size == 0:
            continue
        # Sorted times: piece boundaries by bisection instead of a search per sample.
        count += np.searchsorted(t, result.window_end) - np.searchsorted(t, result.window_start)
        ts, vs = t[::stride], v[::stride].astype(np.float64)
        piece = np.searchsorted(result.window_start, ts, side="right") - 1
        inside = (piece >= 0) & (ts < result.window_end[np.maximum(piece, 0)])
        ts, vs, piece = ts[inside], vs[inside], piece[inside]
        # Inside its piece the offset is the piece's own line (what offset_at gives there).
        mapped = ts - (result.offset_s[piece] + result.drift[piece] * (ts - mid[piece]))
        inside = (mapped >= rt[0]) & (mapped <= rt[-1])
        if holes.size:
            hole = np.searchsorted(holes[:, 0], mapped, side="right") - 1
            inside &= ~((hole >= 0) & (mapped < holes[np.maximum(hole, 0), 1]))
        if not inside.any():
            continue
        mapped, vs, piece = mapped[inside], vs[inside], piece[inside]
        first, last = np.searchsorted(rt, [mapped[0], mapped[-1]])
        x = np.interp(mapped, rt[max(first - 1, 0):last + 1], rv[max(first - 1, 0):last + 1])
        for row, w in enumerate((None, vs, x, vs * vs, x * x, vs * x)):
            sums[row] += np.bincount(piece, weights=w, minlength=n)
    used, sv, sx, svv, sxx, svx = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = svx - sv * sx / used
        correlation = cov / np.sqrt((svv - sv * sv / used) * (sxx - sx * sx / used))
    return correlation, count


def alignment_from_table(table: Mapping[str, Any], meter: str, mains_hz: float = 50.0) -> Alignment:
    """Rebuild one meter's :class:`Alignment` from the long table of a run's ``alignment``
    stream (columns ``meter``, ``reference``, ``kind``, ``window_start``, ``window_end``,
    ``offset_s``, ``drift``, ``uncertainty_s``, ``correlation``, ``n_samples``, ``step_s``,
    each optionally prefixed ``alignment_``), e.g. ``run["alignment"].read()``.
    """

    def column(name: str) -> np.ndarray:
        for key in (f"alignment_{name}", name):
            if key in table:
                return np.asarray(table[key])
        raise AlignmentError(f"the alignment table has no column {name!r}")

    meters = column("meter").astype(str)
    kinds = column("kind").astype(str)
    mine = meters == meter
    if not mine.any():
        raise AlignmentError(
            f"meter {meter!r} is not in the alignment table (meters: {sorted(set(meters))})")
    pieces = mine & (kinds == "piece")
    breaks = mine & (kinds == "break")
    start = column("window_start").astype(np.float64)
    end = column("window_end").astype(np.float64)
    order = np.argsort(start[pieces], kind="stable")
    return Alignment(
        meter=meter,
        reference=str(column("reference").astype(str)[mine][0]),
        window_start=start[pieces][order],
        window_end=end[pieces][order],
        offset_s=column("offset_s").astype(np.float64)[pieces][order],
        drift=column("drift").astype(np.float64)[pieces][order],
        uncertainty_s=column("uncertainty_s").astype(np.float64)[pieces][order],
        correlation=column("correlation").astype(np.float64)[pieces][order],
        n_samples=column("n_samples").astype(np.int64)[pieces][order],
        n_blocks=np.zeros(int(pieces.sum()), dtype=np.int64),
        breaks=np.stack([start[breaks], end[breaks]], axis=1).reshape(-1, 2),
        break_step_s=column("step_s").astype(np.float64)[breaks],
        mains_hz=mains_hz,
        notes=("rebuilt from a run's alignment stream",),
    )
