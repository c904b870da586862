"""The ``alignment`` stream: how well a run's meters line up, measured on their waveforms.

Intent: NTP gives each meter its time to within the confidence of its syncs (§6.2); meters
on the same phase see the same voltage, so the residual offset between their recordings can
be measured afterwards to microseconds.  At the end of a multi-meter fly,
:class:`AlignmentStream` aligns every meter's recorded L1 voltage and modelled time axis
against a reference (:func:`smartmeter_ophyd.storage.align_recordings`) and is collected as
the ``alignment`` stream: one event per window piece and per break (gap or sample step), in
a long format (``meter``, ``reference``, ``kind`` = ``piece``/``break``, ...), so a reader can
rebuild the result with :func:`smartmeter_ophyd.timing.alignment_from_table` and apply it
with :func:`smartmeter_ophyd.timing.apply_alignment`.

Limits: it assumes the meters' ``v_l1`` channels measure the same phase (the plans say so
in their docs); a meter without ``v_l1`` (``v,i_L2``, latched modes) or without samples is
left out with a note in the log.  The computation costs about 15 ms per meter and 10 s of
8 kHz data (reading included), a few seconds per meter-hour.  :meth:`AlignmentStream.open`
launches a worker process (:class:`smartmeter_ophyd.storage.AlignmentWorker`) while the
meters sample; :meth:`AlignmentStream.start` hands it the complete files, so the alignment
runs on the host's other core while the RunEngine writes the run's other end-of-run records;
``collect`` then waits for it.  Without ``start`` it runs when the stream is collected, in
this process.  :meth:`AlignmentStream.close` ends the worker (at once if it is still busy).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from ._keys import scalar_key

if TYPE_CHECKING:
    from ..storage import AlignmentWorker, RecordedAlignment
    from ..timing import Alignment
    from ._smartmeter import SmartMeter

logger = logging.getLogger(__name__)

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


class AlignmentStream:
    """Collectable: every meter's residual offset against ``reference`` (default the first)."""

    name = "alignment"

    def __init__(self, meters: Sequence[SmartMeter], reference: str | None = None) -> None:
        self.meters = list(meters)
        self.reference = reference or (self.meters[0].name if self.meters else "")
        self.parent = None
        self.results: dict[str, Alignment] = {}
        self._collected = False
        self._worker: AlignmentWorker | None = None
        self._submitted = False

    def open(self) -> None:
        """Launch the worker process now (its imports take a few tenths of a second)."""
        if self._worker is None:
            from ..storage import AlignmentWorker

            self._worker = AlignmentWorker()
            self._worker.start()

    def start(self) -> None:
        """Hand the meters' files to the worker (they must be complete); ``open`` first if
        not opened."""
        if not self._submitted:
            self.open()
            assert self._worker is not None
            self._worker.submit(self.reference, self._files())
            self._submitted = True

    def close(self) -> None:
        """End the worker process (at once if it is still computing).  Idempotent."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def _files(self) -> dict[str, str]:
        return {m.name: path for m in self.meters if (path := m.hdf5_path) is not None}

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        return {
            f"alignment_{field}": scalar_key(f"smartmeter-ophyd/alignment/{field}", dtype,
                                             dtype_numpy, units)
            for field, (dtype, dtype_numpy, units) in FIELDS.items()
        }

    def compute(self) -> dict[str, Alignment]:
        """Align every meter against the reference: the worker's answer if ``start`` was
        called, else computed here."""
        from ..storage import AlignmentWorkerError, align_recordings

        if self._submitted:
            assert self._worker is not None
            try:
                found: RecordedAlignment = self._worker.result()
            except AlignmentWorkerError as exc:  # the samples are safe; only this record lacks
                logger.error("alignment: %s; the run gets no alignment stream", exc)
                return {}
        else:
            found = align_recordings(self.reference, self._files())
        for level, note in found.notes:
            logger.log(level, "%s", note)
        self.results = found.results
        return found.results

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        if self._collected:
            return
        self._collected = True
        self.compute()
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
