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
left out with a note in the log.  The computation costs about 10 ms per meter and 10 s of
8 kHz data in a worker (reading included; ~18 ms in this process), a few seconds per
meter-hour.
:meth:`AlignmentStream.follow` launches worker processes
(:class:`smartmeter_ophyd.storage.AlignmentWorker`, one per ``METERS_PER_WORKER`` meters, at
most one per core) while the meters sample, and hands each its share of the files, a file
as soon as that meter's fly is complete: the alignment runs on the host's other cores while
the other files close and the RunEngine writes the run's other end-of-run records.
:meth:`AlignmentStream.start` asks for the result and ``collect`` waits for it.  Without
``start``, or if a worker fails, it runs in this process when the stream is collected.
:meth:`AlignmentStream.close` ends the workers (at once if still busy).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..storage import AlignmentWorker, AlignmentWorkerError, RecordedAlignment, align_recordings
from ._keys import scalar_key

if TYPE_CHECKING:
    from ophyd.status import StatusBase as Status

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


METERS_PER_WORKER: Final = 16
"""A worker process per this many meters, at most one per core: 50 meters x 10 s of 8 kHz
data are ~0.5 s of alignment for one worker, about what the files take to close."""


def worker_count(meters: int, cores: int | None = None) -> int:
    """How many worker processes share the alignment of ``meters`` meters."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(cores, math.ceil(meters / METERS_PER_WORKER)))


class AlignmentStream:
    """Collectable: every meter's residual offset against ``reference`` (default the first)."""

    name = "alignment"

    def __init__(self, meters: Sequence[SmartMeter], reference: str | None = None) -> None:
        self.meters = list(meters)
        self.reference = reference or (self.meters[0].name if self.meters else "")
        self.parent = None
        self.results: dict[str, Alignment] = {}
        self._collected = False
        self._workers: list[AlignmentWorker] = []
        self._failed = False
        self._following = False
        self._submitted = False
        others = [m.name for m in self.meters if m.name != self.reference]
        count = worker_count(len(self.meters))
        self._share = {name: k % count for k, name in enumerate(others)}
        """Which worker aligns which meter (each gets the reference too)."""

    def open(self) -> None:
        """Launch the worker processes now (their imports take a few tenths of a second)."""
        if self._workers or self._failed:
            return
        count = max(self._share.values(), default=0) + 1
        workers = [AlignmentWorker() for _ in range(count)]
        self._workers = workers
        try:
            for worker in workers:
                worker.start()
        except AlignmentWorkerError as exc:
            self._fail(exc)

    def follow(self, completes: Mapping[str, Status]) -> None:
        """Align each meter's file in a worker as soon as its fly is complete (its
        ``complete`` status, by meter name, is done).  Each call begins anew: a resumed run
        aligns its last segment's files."""
        self.open()
        workers = list(self._workers)
        try:
            for worker in workers:
                worker.begin(self.reference)
        except AlignmentWorkerError as exc:
            self._fail(exc)
            return
        if not workers:
            return
        self._following = True
        for meter in self.meters:
            status = completes.get(meter.name)
            if status is not None:
                status.add_callback(functools.partial(self._complete, workers, meter))

    def _complete(self, workers: list[AlignmentWorker], meter: SmartMeter,
                  _status: Status) -> None:
        """On the thread that finished the status (the client's loop): small writes."""
        path = meter.hdf5_path
        if path is None or workers != self._workers:
            return
        share = self._share.get(meter.name)
        try:
            for worker in workers if share is None else [workers[share]]:
                worker.add(meter.name, path)
        except AlignmentWorkerError as exc:  # said once, when the result is asked for
            logger.debug("alignment: %s not handed over: %s", meter.name, exc)

    def start(self) -> None:
        """Ask the workers for the result (the files must be complete; the ones ``follow``
        did not hand over go now); ``open`` first if not opened."""
        if self._submitted:
            return
        self.open()
        if not self._workers:
            return
        files = self._files()
        try:
            for k, worker in enumerate(self._workers):
                mine = {name: path for name, path in files.items()
                        if name == self.reference or self._share.get(name) == k}
                if self._following:
                    worker.finish(mine)
                else:
                    worker.submit(self.reference, mine)
        except AlignmentWorkerError as exc:
            self._fail(exc)
            return
        self._submitted = True

    def _fail(self, exc: AlignmentWorkerError) -> None:
        """The workers are no use: the alignment is computed here when collected."""
        logger.warning("alignment: %s; computed in this process instead", exc)
        self._failed = True
        self.close()

    def close(self) -> None:
        """End the worker processes (at once if still computing).  Idempotent."""
        workers, self._workers = self._workers, []
        for worker in workers:
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
        """Align every meter against the reference: the workers' answer if ``start`` was
        called, else (or if a worker failed) computed here."""
        found: RecordedAlignment | None = None
        if self._submitted and self._workers:
            try:
                found = RecordedAlignment.merged(
                    self.reference, [worker.result() for worker in self._workers])
            except AlignmentWorkerError as exc:
                self._fail(exc)
        if found is None:
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
