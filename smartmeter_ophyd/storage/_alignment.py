"""Align meters' recorded HDF5 files on their L1 voltages, here or in a process of its own.

Intent: NTP gives each meter its time to within the confidence of its syncs (§6.2); meters on
the same phase see the same voltage, so the residual offset between their recordings can be
measured afterwards (:class:`smartmeter_ophyd.timing.Aligner`).  :func:`align_recordings`
reads each file's ``v_l1`` and (modelled) ``/time`` and aligns every meter against a reference,
one meter at a time: memory holds the reference's and one other meter's waveform (a meter-hour
at 8 kHz is ~350 MB of times and voltages), never every meter's.

:class:`AlignmentSession` does the same one file at a time, as the files become complete.
:class:`AlignmentWorker` runs sessions in a process of its own (``python -m
smartmeter_ophyd.storage._alignment_main``, messages and results pickled over its pipes; once
asked, it sends each meter's result as soon as it has it).  At
the end of a multi-meter fly the acquisition process closes every meter's file and writes the
run's last documents; the alignment (numpy and h5py, ~8 ms per meter and 10 s of 8 kHz data in
a worker, ~4 s per meter-hour; more in a process with the writer's mmap threshold) would compete with them for the
GIL.  In its own process it uses the host's other core, it follows the files as they close,
and its imports are paid when it starts (before the meters sample), not when the run ends.

Limits: the meters' ``v_l1`` must measure the same phase (the plans say so); a meter without
``v_l1`` (``v,i_L2``, latched modes) or without samples is left out, with a note.  Notes are
returned, not logged, so that the caller logs them in its own process.  One request at a time.
A launched (not forked) process: the acquisition process runs threads (RunEngine, client
loop, HDF5 I/O) whose locks a fork would copy held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc2 filter the files are written with)
import numpy as np

from ..timing import Aligner, Alignment, AlignmentError, Waveform

__all__ = ["AlignmentWorker", "AlignmentWorkerError", "RecordedAlignment", "align_recordings",
           "read_waveform"]

logger = logging.getLogger(__name__)

CHANNEL: Final = "v_l1"
NOTHING_TO_ALIGN: Final = f"alignment: fewer than two meters with {CHANNEL}; nothing to align"
SPAN_PAD_S: Final = 2.0
"""How far past the reference's recording another meter's may reach and still be aligned
as soon as it is complete (see :class:`AlignmentSession`)."""


@dataclass(frozen=True)
class RecordedAlignment:
    """What :func:`align_recordings` found: each aligned meter's result, and notes."""

    reference: str
    results: dict[str, Alignment] = field(default_factory=dict)
    notes: tuple[tuple[int, str], ...] = ()
    """``(logging level, message)``: meters left out and why."""

    @classmethod
    def merged(cls, reference: str, parts: Sequence[RecordedAlignment]) -> RecordedAlignment:
        """One answer from sessions that shared out the meters (each with ``reference``):
        every result, each note once, and "nothing to align" only if nothing was."""
        results: dict[str, Alignment] = {}
        for part in parts:
            results.update(part.results)
        notes = dict.fromkeys(note for part in parts for note in part.notes)
        if results:
            notes.pop((logging.INFO, NOTHING_TO_ALIGN), None)
        return cls(reference, results, tuple(notes))


class AlignmentWorkerError(RuntimeError):
    """The worker process failed or died; the message says how."""


def read_waveform(name: str, path: str) -> Waveform | None:
    """The recording at ``path`` as a :class:`Waveform` (None without two ``v_l1`` samples).

    A §6.5 duplicate is a copy of the sample before it, stored with the same time: it
    carries nothing to align on and is left out (the waveform needs increasing times).
    """
    with h5py.File(path, "r", swmr=True) as f:
        if CHANNEL not in f or f[CHANNEL].shape[0] < 2:
            return None
        times = f["time"][()].astype(np.float64, copy=False)
        voltage = f[CHANNEL][()]
    repeated = np.flatnonzero(times[1:] == times[:-1])
    if repeated.size == 0:
        return Waveform(name, times, voltage)
    fresh = np.ones(times.shape, dtype=bool)
    fresh[repeated + 1] = False
    return Waveform(name, times[fresh], voltage[fresh])


def align_recordings(reference: str, files: Mapping[str, str]) -> RecordedAlignment:
    """Align every recording in ``files`` (meter name -> HDF5 path) against ``reference``'s.

    A meter that cannot be read or aligned is left out with a note; so is everything when
    the reference has no ``v_l1`` samples or fewer than two meters have.
    """
    return AlignmentSession(reference).finish(files)


class AlignmentSession:
    """:func:`align_recordings` one file at a time, as the files become complete.

    ``add`` aligns a meter at once if the reference has come (the reference waits for
    nothing; a meter added before it waits for it), so the work can follow the meters' files
    closing one by one.  The windows lie on whole seconds: the reference's span widened by
    ``pad_s`` on each side gives the same windows as the span over every meter (the empty
    ones yield no rows), so a meter is aligned without waiting for the others.  A meter
    outside that span is aligned at ``finish``, over the exact span.
    """

    def __init__(self, reference: str, pad_s: float = SPAN_PAD_S) -> None:
        self.reference = reference
        self.pad_s = pad_s
        self._paths: dict[str, str] = {}
        self._aligner: Aligner | None = None
        self._reference_failed = False
        self._waiting: list[str] = []
        self._outside: dict[str, tuple[float, float]] = {}
        self._results: dict[str, Alignment] = {}
        self._notes: list[tuple[int, str]] = []
        self._with_voltage: set[str] = set()
        self._told = (0, 0)
        """How many results and notes ``finish`` has announced."""

    def add(self, name: str, path: str) -> None:
        """``name``'s recording at ``path`` is complete (a second ``add`` of it is ignored)."""
        if name in self._paths:
            return
        self._paths[name] = path
        if name == self.reference:
            self._begin(path)
            waiting, self._waiting = self._waiting, []
            for other in waiting:
                self._align(other)
        elif self._aligner is None and not self._reference_failed:
            self._waiting.append(name)
        else:
            self._align(name)

    def finish(self, files: Mapping[str, str],
               announce: Callable[[RecordedAlignment], None] | None = None) -> RecordedAlignment:
        """Add what ``files`` holds that was not added (the reference first), align what
        lay outside the reference's span, and return everything found.

        ``announce`` is handed, as the work goes, what was found and not yet announced
        (first what ``add`` found before): each result and note once, all of them by the
        time this returns.
        """

        def tell() -> None:
            if announce is not None and (part := self._news()) is not None:
                announce(part)

        tell()
        if self.reference in files:
            self.add(self.reference, files[self.reference])
            tell()
        for name, path in files.items():
            self.add(name, path)
            tell()
        for name in self._waiting:  # the reference never came
            self._note(logging.WARNING, f"alignment: {name} left out: the reference "
                                        f"{self.reference!r} has no recording")
        self._waiting = []
        if self._outside and self._aligner is not None:
            self._align_outside(tell)
        if not self._results and len(self._with_voltage) < 2:
            self._note(logging.INFO, NOTHING_TO_ALIGN)
        tell()
        return RecordedAlignment(self.reference, dict(self._results), tuple(self._notes))

    def _news(self) -> RecordedAlignment | None:
        """What was found since the previous call (None if nothing)."""
        results = {name: self._results[name] for name in list(self._results)[self._told[0]:]}
        notes = tuple(self._notes[self._told[1]:])
        self._told = (len(self._results), len(self._notes))
        return RecordedAlignment(self.reference, results, notes) if results or notes else None

    def _note(self, level: int, message: str) -> None:
        self._notes.append((level, message))

    def _begin(self, path: str) -> None:
        try:
            wave = read_waveform(self.reference, path)
            if wave is None:
                self._note(logging.INFO, f"alignment: {self.reference} has no {CHANNEL} "
                                         f"samples; left out")
                raise AlignmentError(f"the reference {self.reference!r} has no samples")
            self._with_voltage.add(self.reference)
            first, last = wave.span
            self._aligner = Aligner(wave, (first - self.pad_s, last + self.pad_s))
        except (AlignmentError, OSError) as exc:
            self._reference_failed = True
            self._note(logging.WARNING,
                       f"alignment: reference {self.reference}: {exc}; nothing aligned")

    def _align(self, name: str) -> None:
        if self._aligner is None:
            return  # the reference failed: said once, in _begin
        aligner = self._aligner
        try:
            wave = read_waveform(name, self._paths[name])
            if wave is None:
                self._note(logging.INFO, f"alignment: {name} has no {CHANNEL} samples; "
                                         f"left out")
                return
            self._with_voltage.add(name)
            first, last = wave.span
            if not (aligner.span[0] <= first and last <= aligner.span[1]):
                self._outside[name] = (first, last)
                return
            self._results[name] = aligner(wave)
        except (AlignmentError, OSError) as exc:
            self._note(logging.WARNING, f"alignment: {name} left out: {exc}")

    def _align_outside(self, tell: Callable[[], None]) -> None:
        assert self._aligner is not None
        reference = self._aligner.reference
        spans = [reference.span, *self._outside.values()]
        try:
            aligner = Aligner(reference, (min(a for a, _ in spans), max(b for _, b in spans)))
        except AlignmentError as exc:
            for name in self._outside:
                self._note(logging.WARNING, f"alignment: {name} left out: {exc}")
            return
        for name in self._outside:
            try:
                wave = read_waveform(name, self._paths[name])
                if wave is not None:
                    self._results[name] = aligner(wave)
            except (AlignmentError, OSError) as exc:
                self._note(logging.WARNING, f"alignment: {name} left out: {exc}")
            tell()
        self._outside.clear()


class AlignmentWorker:
    """A process of its own running alignment sessions (:class:`AlignmentSession`), one at
    a time.

    ``start`` launches it (idempotent; its imports take a few tenths of a second, so start it
    well before it is needed).  ``begin`` opens a session (dropping an unfinished one),
    ``add`` hands it a complete file (from any thread), ``finish`` asks for the result;
    ``parts`` then yields it piece by piece as the worker computes it (a meter's result as
    soon as it is aligned) and ``result`` waits for all of it; ``submit`` is ``begin`` +
    ``finish``.  Once asked, the worker writes each part as it comes: read them without
    pausing long (its pipe holds ~64 kB, about one meter-hour's part), or it waits for the
    reader.  ``close`` ends the process (killing it if it is still computing).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._pending = False
        self._reference = ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before ``start`` and after ``close``)."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        with self._lock:
            if self._process is None:
                try:
                    # a session of its own: a Ctrl-C at the terminal goes to the caller,
                    # which aborts the run and ends the worker (or the worker's input closes)
                    self._process = subprocess.Popen(
                        [sys.executable, "-m", "smartmeter_ophyd.storage._alignment_main"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        env=_child_environment(), start_new_session=True,
                    )
                except OSError as exc:
                    raise AlignmentWorkerError(
                        f"cannot launch the alignment worker: {exc}") from exc

    def begin(self, reference: str) -> None:
        """A new session against ``reference`` (``start`` first if not started)."""
        self.start()
        self._send(("begin", reference))
        self._reference = reference

    def add(self, name: str, path: str) -> None:
        """``name``'s file at ``path`` is complete: aligned as soon as the reference is."""
        self._send(("add", name, path))

    def finish(self, files: Mapping[str, str]) -> None:
        """Ask for the session's result over ``files`` (what was not added is added)."""
        if self._pending:
            raise AlignmentWorkerError("the alignment worker is still busy with a request")
        self._send(("finish", dict(files)))
        self._pending = True

    def submit(self, reference: str, files: Mapping[str, str]) -> None:
        """:func:`align_recordings` in the worker: ``result`` gives the answer."""
        self.begin(reference)
        self.finish(files)

    def parts(self) -> Iterator[RecordedAlignment]:
        """The finished session's answer in parts, each as the worker finds it (blocks
        between them); ``RecordedAlignment.merged`` of all of them is the whole answer."""
        if not self._pending:
            raise AlignmentWorkerError("no alignment request is pending")
        process = self._process
        assert process is not None and process.stdout is not None
        try:
            while True:
                try:
                    kind, payload = pickle.load(process.stdout)
                except (EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
                    raise AlignmentWorkerError(
                        f"the alignment worker is gone: {self._exit()}") from exc
                if kind == "done":
                    return
                if kind != "part":
                    raise AlignmentWorkerError(f"the alignment worker failed: {payload}")
                assert isinstance(payload, RecordedAlignment)
                yield payload
        finally:
            self._pending = False

    def result(self) -> RecordedAlignment:
        """The finished session's whole answer (blocks until it comes)."""
        return RecordedAlignment.merged(self._reference, list(self.parts()))

    def close(self, timeout: float = 5.0) -> None:
        """End the process: at once if it is computing, else after its input closes."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        if self._pending:
            process.kill()
            self._pending = False
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("the alignment worker (pid %d) did not end in %.0f s; killed",
                           process.pid, timeout)
            process.kill()
            process.wait()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            process = self._process
            if process is None or process.stdin is None:
                raise AlignmentWorkerError("the alignment worker is not running")
            try:
                pickle.dump(message, process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                process.stdin.flush()
            except OSError as exc:
                raise AlignmentWorkerError(
                    f"the alignment worker is gone: {self._exit()}") from exc

    def _exit(self) -> str:
        process = self._process
        if process is None:
            return "not started"
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1.0)
        code = process.poll()
        return "still running" if code is None else f"exited with {code}"

    def __enter__(self) -> AlignmentWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WORKER_MALLOC: Final = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                         "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
"""glibc settings of a worker unless the environment has its own: the alignment's temporaries
come from the heap and are reused, not mapped and unmapped each time (half of its time with
the acquisition process's fixed 128 KiB threshold, :mod:`._hdf5`'s "Memory"); a worker lives
one run, so the fragmentation that threshold guards against does not build up."""


def _child_environment() -> dict[str, str]:
    """This environment, with this package's directory first on the child's path (the
    package may be imported from a source tree that is not installed) and
    :data:`WORKER_MALLOC`."""
    env = {**WORKER_MALLOC, **os.environ}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def serve(requests: IO[bytes], answers: IO[bytes]) -> int:
    """The worker's loop: ``("begin", reference)``, ``("add", name, path)`` and
    ``("finish", files)`` in; per ``finish``, pickled ``("part", RecordedAlignment)`` out as
    the session finds them, then ``("done", None)``, or ``("failed", error)`` instead of the
    rest; until its input closes."""

    def send(kind: str, payload: Any) -> None:
        pickle.dump((kind, payload), answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()

    session: AlignmentSession | None = None
    failure: str | None = None
    while True:
        try:
            kind, *arguments = pickle.load(requests)
        except EOFError:
            return 0
        try:
            if kind == "begin":
                session, failure = AlignmentSession(*arguments), None
            elif session is not None and failure is None and kind == "add":
                session.add(*arguments)
            elif kind == "finish":
                finishing, session = session, None
                if finishing is None or failure is not None:
                    send("failed", failure or "finish before begin")
                else:
                    (files,) = arguments
                    finishing.finish(files, announce=lambda part: send("part", part))
                    send("done", None)
        except Exception as exc:  # reported at finish, to the caller who names the run
            failure = f"{type(exc).__name__}: {exc}"
            if kind == "finish":
                send("failed", failure)
