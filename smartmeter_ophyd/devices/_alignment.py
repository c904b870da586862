"""The ``alignment`` stream: how well a run's meters line up, measured on their waveforms.

Intent: NTP gives each meter its time to within the confidence of its syncs (§6.2); meters
on the same phase see the same voltage, so the residual offset between their recordings can
be measured afterwards to microseconds.  At the end of a multi-meter fly,
:class:`AlignmentStream` aligns every meter's recorded L1 voltage and modelled time axis
against a reference (:func:`smartmeter_ophyd.storage.align_recordings`) and is collected as
the ``alignment`` stream: one event per window piece and per break (gap or sample step), in
a long format (``meter``, ``reference``, ``kind`` = ``piece``/``break``, ...), in event pages
as the results come (rows of one meter together), so a reader can rebuild the result with
:func:`smartmeter_ophyd.timing.alignment_from_table` and apply it with
:func:`smartmeter_ophyd.timing.apply_alignment`.

Limits: it assumes the meters' ``v_l1`` channels measure the same phase (the plans say so
in their docs); a meter without ``v_l1`` (``v,i_L2``, latched modes) or without samples is
left out with a note in the log.  The computation costs about 8 ms per meter and 10 s of
8 kHz data in a worker (reading included; more in this process), ~4 s per meter-hour.
:meth:`AlignmentStream.follow` launches worker processes
(:class:`smartmeter_ophyd.storage.AlignmentWorker`, one per ``METERS_PER_WORKER`` meters, at
most one per core) while the meters sample, and hands each its share of the files, a file
as soon as that meter's fly is complete: the alignment runs on the host's other cores while
the other files close and the RunEngine writes the run's other end-of-run records.
:meth:`AlignmentStream.start` asks for the result and ``collect`` takes it meter by meter as
the workers send it, so the RunEngine composes one meter's page (bluesky validates it, ~0.2 ms
per row) while the workers align the next.  Without ``start``, or for the meters a failed
worker did not give, it runs in this process when the stream is collected.
:meth:`AlignmentStream.close` ends the workers (at once if still busy).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
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
        for results in self._arrivals():
            self.results.update(results)
        return self.results

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        """An event page of what has come each time results come: the RunEngine composes
        (and validates) those rows while the workers align the next meters."""
        if self._collected:
            return
        self._collected = True
        for results in self._arrivals():
            self.results.update(results)
            page = _page(results)
            if page is not None:
                yield page

    def _arrivals(self) -> Iterator[dict[str, Alignment]]:
        """The aligned meters' results as they come, everything that has come at once (the
        workers', if ``start`` was called; what a failed worker did not give is computed
        here); then the notes, logged once."""
        parts: list[RecordedAlignment] = []
        given: set[str] = set()
        asked = self._submitted and bool(self._workers)
        if asked:
            try:
                for batch in _parts_as_they_come(self._workers):
                    parts.extend(batch)
                    results = {name: result for part in batch
                               for name, result in part.results.items()}
                    given.update(results)
                    if results:
                        yield results
            except AlignmentWorkerError as exc:
                self._fail(exc)
        if not asked or self._failed:
            files = self._files()
            rest = {name: path for name, path in files.items() if name not in given}
            found = align_recordings(self.reference, rest)
            parts.append(found)
            if found.results:
                yield found.results
        for level, note in RecordedAlignment.merged(self.reference, parts).notes:
            logger.log(level, "%s", note)


def _page(results: Mapping[str, Alignment]) -> dict[str, Any] | None:
    """``results`` as one event page of the stream's long table (None without rows)."""
    rows: list[dict[str, Any]] = []
    for name, result in results.items():
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
        return None
    now = time.time()
    data = {f"alignment_{f}": [row[f] for row in rows] for f in FIELDS}
    return {"data": data, "timestamps": {k: [now] * len(rows) for k in data},
            "time": [now] * len(rows)}


_DONE: Final = object()


def _parts_as_they_come(workers: Sequence[AlignmentWorker]) -> Iterator[
        list[RecordedAlignment]]:
    """Every worker's parts as they come, whichever worker sends them: each time, all that
    has come (at least one part).

    A thread per worker reads its parts as they come (each worker writes them into a pipe of
    ~64 kB and would wait for a reader that is busy with the other worker's); they end with
    their worker's answer.  Raises the first worker's failure once every reader has ended.
    """
    arrivals: queue.SimpleQueue[object] = queue.SimpleQueue()

    def read(worker: AlignmentWorker) -> None:
        try:
            for part in worker.parts():
                arrivals.put(part)
        except AlignmentWorkerError as exc:
            arrivals.put(exc)
        finally:
            arrivals.put(_DONE)

    for k, worker in enumerate(workers):
        threading.Thread(target=read, args=(worker,), name=f"alignment-results-{k}",
                         daemon=True).start()
    failure: AlignmentWorkerError | None = None
    reading = len(workers)
    while reading:
        batch: list[RecordedAlignment] = []
        item = arrivals.get()
        while True:
            if item is _DONE:
                reading -= 1
            elif isinstance(item, AlignmentWorkerError):
                failure = failure or item
            else:
                assert isinstance(item, RecordedAlignment)
                batch.append(item)
            try:
                item = arrivals.get_nowait()
            except queue.Empty:
                break
        if batch:
            yield batch
    if failure is not None:
        raise failure
