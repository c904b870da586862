"""Align meters' recorded HDF5 files on their L1 voltages, here or in a process of its own.

Intent: NTP gives each meter its time to within the confidence of its syncs (§6.2); meters on
the same phase see the same voltage, so the residual offset between their recordings can be
measured afterwards (:class:`smartmeter_ophyd.timing.Aligner`).  :func:`align_recordings`
reads each file's ``v_l1`` and (modelled) ``/time`` and aligns every meter against a reference,
one meter at a time: memory holds the reference's and one other meter's waveform (a meter-hour
at 8 kHz is ~350 MB of times and voltages), never every meter's.

:class:`AlignmentWorker` runs it in a process of its own (``python -m
smartmeter_ophyd.storage._alignment_main``, requests and results pickled over its pipes).  At
the end of a multi-meter fly the acquisition process closes every meter's file and writes the
run's last documents; the alignment (numpy and h5py, ~15 ms per meter and 10 s of 8 kHz data)
would compete with them for the GIL.  In its own process it uses the host's other core, and its
imports are paid when it starts (before the meters sample), not when the run ends.

Limits: the meters' ``v_l1`` must measure the same phase (the plans say so); a meter without
``v_l1`` (``v,i_L2``, latched modes) or without samples is left out, with a note.  Notes are
returned, not logged, so that the caller logs them in its own process.  One request at a time.
A launched (not forked) process: the acquisition process runs threads (RunEngine, client
loop, HDF5 I/O) whose locks a fork would copy held.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping
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


@dataclass(frozen=True)
class RecordedAlignment:
    """What :func:`align_recordings` found: each aligned meter's result, and notes."""

    reference: str
    results: dict[str, Alignment] = field(default_factory=dict)
    notes: tuple[tuple[int, str], ...] = ()
    """``(logging level, message)``: meters left out and why."""


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
        times = f["time"][()].astype(np.float64)
        voltage = f[CHANNEL][()]
    fresh = np.ones(times.shape, dtype=bool)
    fresh[1:] = times[1:] != times[:-1]
    return Waveform(name, times[fresh], voltage[fresh])


def read_span(path: str) -> tuple[float, float] | None:
    """(first, last) finite time of the recording at ``path``, reading only the ends where
    they are finite (None without two ``v_l1`` samples)."""
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


def align_recordings(reference: str, files: Mapping[str, str]) -> RecordedAlignment:
    """Align every recording in ``files`` (meter name -> HDF5 path) against ``reference``'s.

    A meter that cannot be read or aligned is left out with a note; so is everything when
    the reference has no ``v_l1`` samples or fewer than two meters have.
    """
    notes: list[tuple[int, str]] = []
    spans: dict[str, tuple[float, float]] = {}
    for name, path in files.items():
        try:
            span = read_span(path)
        except OSError as exc:
            notes.append((logging.WARNING, f"alignment: {name} left out: {exc}"))
            continue
        if span is None:
            notes.append((logging.INFO, f"alignment: {name} has no {CHANNEL} samples; left out"))
            continue
        spans[name] = span
    if reference not in spans or len(spans) < 2:
        notes.append((logging.INFO,
                      f"alignment: fewer than two meters with {CHANNEL}; nothing to align"))
        return RecordedAlignment(reference, {}, tuple(notes))
    whole = (min(a for a, _ in spans.values()), max(b for _, b in spans.values()))
    try:
        reference_wave = read_waveform(reference, files[reference])
        if reference_wave is None:
            raise AlignmentError(f"the reference {reference!r} has no samples")
        aligner = Aligner(reference_wave, whole)
    except (AlignmentError, OSError) as exc:
        notes.append((logging.WARNING,
                      f"alignment: reference {reference}: {exc}; nothing aligned"))
        return RecordedAlignment(reference, {}, tuple(notes))
    results: dict[str, Alignment] = {}
    for name in spans:
        if name == reference:
            continue
        try:
            waveform = read_waveform(name, files[name])
            if waveform is not None:
                results[name] = aligner(waveform)
        except (AlignmentError, OSError) as exc:
            notes.append((logging.WARNING, f"alignment: {name} left out: {exc}"))
        waveform = None  # before the next is read: two meters in memory, not three
    return RecordedAlignment(reference, results, tuple(notes))


class AlignmentWorker:
    """A process of its own running :func:`align_recordings`, one request at a time.

    ``start`` launches it (idempotent; its imports take a few tenths of a second, so start it
    well before the first request), ``submit`` sends a request, ``result`` waits for it,
    ``close`` ends the process (killing it if a request is still running).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._pending = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before ``start`` and after ``close``)."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        if self._process is not None:
            return
        self._process = subprocess.Popen(
            [sys.executable, "-m", "smartmeter_ophyd.storage._alignment_main"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_environment(),
        )

    def submit(self, reference: str, files: Mapping[str, str]) -> None:
        """Ask for :func:`align_recordings` (``start`` first if not started)."""
        if self._pending:
            raise AlignmentWorkerError("the alignment worker is still busy with a request")
        self.start()
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            pickle.dump((reference, dict(files)), process.stdin,
                        protocol=pickle.HIGHEST_PROTOCOL)
            process.stdin.flush()
        except OSError as exc:
            raise AlignmentWorkerError(f"the alignment worker is gone: {self._exit()}") from exc
        self._pending = True

    def result(self) -> RecordedAlignment:
        """The last request's answer (blocks until it comes)."""
        if not self._pending:
            raise AlignmentWorkerError("no alignment request is pending")
        process = self._process
        assert process is not None and process.stdout is not None
        self._pending = False
        try:
            ok, payload = pickle.load(process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise AlignmentWorkerError(f"the alignment worker is gone: {self._exit()}") from exc
        if not ok:
            raise AlignmentWorkerError(f"the alignment worker failed: {payload}")
        assert isinstance(payload, RecordedAlignment)
        return payload

    def close(self, timeout: float = 5.0) -> None:
        """End the process: at once if a request is running, else after its input closes."""
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


def _child_environment() -> dict[str, str]:
    """This environment, with this package's directory first on the child's path (the
    package may be imported from a source tree that is not installed)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def serve(requests: IO[bytes], answers: IO[bytes]) -> int:
    """The worker's loop: one pickled ``(reference, files)`` in, one ``(ok, payload)`` out,
    until its input closes."""
    while True:
        try:
            reference, files = pickle.load(requests)
        except EOFError:
            return 0
        try:
            answer: tuple[bool, Any] = (True, align_recordings(reference, files))
        except Exception as exc:  # reported to the caller, who names the run
            answer = (False, f"{type(exc).__name__}: {exc}")
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()
