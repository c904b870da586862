"""The ``alignment`` stream: how well a run's meters line up, measured on their waveforms.

Intent: NTP gives each meter its time to within the confidence of its syncs (§6.2); meters
on the same phase see the same voltage, so the residual offset between their recordings can
be measured afterwards to microseconds (:func:`smartmeter_ophyd.timing.align`).  At the end of
a multi-meter fly, :class:`AlignmentStream` reads each meter's L1 voltage and modelled time
axis from its HDF5 file, aligns every meter against a reference, and is collected as the
``alignment`` stream: one event per window piece and per break (gap or sample step), in a
long format (``meter``, ``reference``, ``kind`` = ``piece``/``break``, ...), so a reader can
rebuild the result with :func:`smartmeter_ophyd.timing.alignment_from_table` and apply it
with :func:`smartmeter_ophyd.timing.apply_alignment`.

Limits: it assumes the meters' ``v_l1`` channels measure the same phase (the plans say so
in their docs); a meter without ``v_l1`` (``v,i_L2``, latched modes) or without samples is
left out with a note in the log.  Meters are read one at a time (the reference and one other
in memory).  The computation costs about 15 ms per meter and 10 s of
8 kHz data (reading included), a few seconds per meter-hour.  :meth:`AlignmentStream.start`
runs it on a worker thread (most of its time is in numpy and HDF5, which release the GIL)
while the RunEngine writes the run's other end-of-run records; ``collect`` then waits for
it.  Without ``start`` it runs when the stream is collected, on the RunEngine's thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import h5py
import numpy as np

from ..timing import Aligner, Alignment, AlignmentError, Waveform
from ._keys import scalar_key

if TYPE_CHECKING:
    from ._smartmeter import SmartMeter

logger = logging.getLogger(__name__)

CHANNEL: Final = "v_l1"
FIELDS: Final = {
    "meter": ("string", None, ""),
    "reference": ("string", None, ""),
    "kind": ("string", None, ""),
    "window_start": ("number", "<f8", "s"),
    "window_end": ("number", "<f8", "s"),
    "offset_s": ("number", "<f8", "s"),
    "drift": ("number", "<f8", ""),
    "uncertainty_s": ("number", "<f8", "s"),
    "correlation": ("number", "<f8", ""),
    "n_samples": ("integer", "<i8", ""),
    "step_s": ("number", "<f8", "s"),
}


def read_waveform(meter: SmartMeter) -> Waveform | None:
    """The meter's last fly as a :class:`Waveform` (None if it has no ``v_l1`` samples).

    A §6.5 duplicate is a copy of the sample before it, stored with the same time: it
    carries nothing to align on and is left out (the waveform needs increasing times).
    """
    path = meter.hdf5_path
    if path is None:
        return None
    with h5py.File(path, "r", swmr=True) as f:
        if CHANNEL not in f or f[CHANNEL].shape[0] < 2:
            return None
        times = f["time"][()].astype(np.float64)
        voltage = f[CHANNEL][()]
    fresh = np.ones(times.shape, dtype=bool)
    fresh[1:] = times[1:] != times[:-1]
    return Waveform(meter.name, times[fresh], voltage[fresh])


def read_span(meter: SmartMeter) -> tuple[float, float] | None:
    """(first, last) finite time of the meter's last fly, reading only the ends where they
    are finite (None without ``v_l1`` samples)."""
    path = meter.hdf5_path
    if path is None:
        return None
    with h5py.File(path, "r", swmr=True) as f:
        if CHANNEL not in f or f[CHANNEL].shape[0] < 2:
            return None
        times = f["time"]
        first, last = float(times[0]), float(times[times.shape[0] - 1])
        if not (math.isfinite(first) and math.isfinite(last)):
            finite = times[()]
            finite = finite[np.isfinite(finite)]
            if finite.size < 2:
                return None
            first, last = float(finite[0]), float(finite[-1])
    return first, last


class AlignmentStream:
    """Collectable: every meter's residual offset against ``reference`` (default the first)."""

    name = "alignment"

    def __init__(self, meters: Sequence[SmartMeter], reference: str | None = None) -> None:
        self.meters = list(meters)
        self.reference = reference or (self.meters[0].name if self.meters else "")
        self.parent = None
        self.results: dict[str, Alignment] = {}
        self._collected = False
        self._worker: threading.Thread | None = None
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Compute on a worker thread from now on (the meters' files must be complete)."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="alignment", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        try:
            self.compute()
        except BaseException as exc:  # re-raised by collect, on the RunEngine's thread
            self._failure = exc

    def join(self) -> None:
        """Wait for the worker thread, if one was started."""
        if self._worker is not None:
            self._worker.join()

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        return {
            f"alignment_{field}": scalar_key(f"smartmeter-ophyd/alignment/{field}", dtype,
                                             dtype_numpy, units)
            for field, (dtype, dtype_numpy, units) in FIELDS.items()
        }

    def compute(self) -> dict[str, Alignment]:
        """Align every meter against the reference, reading one meter at a time: memory holds
        the reference's and one other meter's waveform (a meter-hour at 8 kHz is ~350 MB of
        times and voltages), never every meter's."""
        spans: dict[str, tuple[float, float]] = {}
        for meter in self.meters:
            try:
                span = read_span(meter)
            except OSError as exc:  # never the end of the run
                logger.warning("alignment: %s left out: %s", meter.name, exc)
                continue
            if span is None:
                logger.info("alignment: %s has no %s samples; left out", meter.name, CHANNEL)
                continue
            spans[meter.name] = span
        if self.reference not in spans or len(spans) < 2:
            logger.info("alignment: fewer than two meters with %s; nothing to align", CHANNEL)
            return {}
        span = (min(a for a, _ in spans.values()), max(b for _, b in spans.values()))
        by_name = {meter.name: meter for meter in self.meters}
        results: dict[str, Alignment] = {}
        try:
            reference = read_waveform(by_name[self.reference])
            if reference is None:
                raise AlignmentError(f"the reference {self.reference!r} has no samples")
            aligner = Aligner(reference, span)
        except (AlignmentError, OSError) as exc:
            logger.warning("alignment: reference %s: %s; nothing aligned", self.reference, exc)
            return {}
        for name in spans:
            if name == self.reference:
                continue
            try:
                waveform = read_waveform(by_name[name])
                if waveform is not None:
                    results[name] = aligner(waveform)
            except (AlignmentError, OSError) as exc:  # never the end of the run
                logger.warning("alignment: %s left out: %s", name, exc)
            waveform = None  # before the next is read: two meters in memory, not three
        self.results = results
        return results

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        if self._collected:
            return
        self._collected = True
        if self._worker is None:
            self.compute()
        self.join()
        if self._failure is not None:
            raise self._failure
        rows: list[dict[str, Any]] = []
        for name, result in self.results.items():
            for k in range(len(result)):
                rows.append({
                    "meter": name, "reference": result.reference, "kind": "piece",
                    "window_start": float(result.window_start[k]),
                    "window_end": float(result.window_end[k]),
                    "offset_s": float(result.offset_s[k]), "drift": float(result.drift[k]),
                    "uncertainty_s": float(result.uncertainty_s[k]),
                    "correlation": float(result.correlation[k]),
                    "n_samples": int(result.n_samples[k]), "step_s": math.nan,
                })
            for (lo, hi), step in zip(result.breaks, result.break_step_s, strict=True):
                rows.append({
                    "meter": name, "reference": result.reference, "kind": "break",
                    "window_start": float(lo), "window_end": float(hi), "offset_s": math.nan,
                    "drift": math.nan, "uncertainty_s": math.nan, "correlation": math.nan,
                    "n_samples": 0, "step_s": float(step),
                })
        if not rows:
            return
        now = time.time()
        data = {f"alignment_{f}": [row[f] for row in rows] for f in FIELDS}
        yield {"data": data, "timestamps": {k: [now] * len(rows) for k in data},
               "time": [now] * len(rows)}
