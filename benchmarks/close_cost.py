"""What the end of a fly costs per meter as the run grows: a 10-s file against a long one.

When a meter's fly ends, its file is finished on the acquisition's I/O thread: the time model
runs over every sample (``timing.model_times``, from the session's records), ``/time`` is
rewritten whole with the modelled times, and the file is closed.  Then the alignment
(a ``storage.AlignmentWorker`` process, as during a fly) reads the meter's ``v_l1`` and
aligns it against the reference's (read once per run, not counted per meter).  All three grow with the run's length; this script
measures them, in this process, for a file of ``--minutes`` of 8 kHz x 6 channels and for a
10-s file (the baseline, same run).

The files are written as the I/O thread writes them (``WaveformWriter``, 400-row appends
with frame numbers, the default compression and chunks), with a 50 Hz voltage on ``v_l1``
and noise elsewhere.  The records are those of a meter synced every ``--ntp-period`` s
that kept its goal (no corrections): the model's cost depends on the number of samples and
records, not on their values.  Writing the long files takes ~1 min of CPU per 30 min of data.

Printed per length: seconds for the time model, the ``/time`` rewrite, the close, and the
alignment of one meter against the reference; then the sum per meter.  Last line:
``end of a fly per meter: X s for M min of data, Y s for 10 s``.  With N meters on one I/O
thread the first three add up N times; the alignment is shared among the worker processes.

Usage: ``python benchmarks/close_cost.py [--minutes 60] [--ntp-period 60]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import host_load

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import AlignmentWorker, WaveformWriter
from smartmeter_ophyd.timing import SessionRecords, SyncRecord, model_times

RATE = 8000
START = 1_750_000_000.25
APPEND = 400
FRAME = 40
NOISE = 0.05


def one_second() -> np.ndarray:
    """A second of rows: 230 V rms at 50 Hz on ``v_l1`` (whole periods, so seconds repeat),
    noise on the other channels."""
    rows = np.random.default_rng(1).standard_normal((RATE, 6)) * NOISE
    rows[:, 0] += 230 * np.sqrt(2) * np.sin(2 * np.pi * 50 * np.arange(RATE) / RATE)
    return rows.astype(np.float32)


def write(path: Path, name: str, seconds: float, offset_s: float = 0.0) -> WaveformWriter:
    """An open file of ``seconds`` of data, written as the I/O thread does."""
    second = one_second()
    frames = np.full(APPEND // FRAME, FRAME)
    writer = WaveformWriter(path, Measures.VI, RATE, START + offset_s, {"name": name})
    packet = 0
    for k in range(int(seconds * RATE) // APPEND):
        first = (k * APPEND) % RATE
        writer.append(second[first:first + APPEND], packets=packet + np.arange(frames.size),
                      frame_samples=frames)
        packet += frames.size
        if k % (RATE // APPEND) == 0:
            writer.live_index()
    return writer


def records(name: str, samples: int, ntp_period: float) -> SessionRecords:
    """A session whose meter synced every ``ntp_period`` s and always met its goal."""
    syncs = []
    t = ntp_period
    while t * RATE < samples:
        goal = int(t * RATE)
        syncs.append(SyncRecord(to_ts=round((START + t) * 1000) / 1000, total=goal, goal=goal,
                                offset_s=0.0, confidence_ms=0.5))
        t += ntp_period
    return SessionRecords(meter=name, rate=RATE, start_ts=START, received=samples,
                          syncs=tuple(syncs), samples=samples, sent_samples=samples,
                          stop_ts=START + samples / RATE)


def finish(writer: WaveformWriter, ntp_period: float) -> dict[str, float]:
    """Time the three steps of a fly's end on ``writer``, as ``FlyController`` runs them."""
    n = writer.samples_appended
    t0 = time.perf_counter()
    modelled = model_times(records(writer.meter_name, n, ntp_period))
    t1 = time.perf_counter()
    writer.rewrite_times(modelled.times, "time model", modelled.notes)
    t2 = time.perf_counter()
    writer.close({"samples": n})
    t3 = time.perf_counter()
    return {"model": t1 - t0, "rewrite": t2 - t1, "close": t3 - t2}


def aligned(worker: AlignmentWorker, files: dict[str, str]) -> float:
    """Seconds for ``worker`` to align ``files`` against ``ref`` (the reference read too)."""
    t0 = time.perf_counter()
    worker.submit("ref", files)
    result = worker.result()
    seconds = time.perf_counter() - t0
    if len(files) > 1 and "m1" not in result.results:
        raise SystemExit(f"the alignment left m1 out: {result.notes}")
    return seconds


def measure(directory: Path, seconds: float, ntp_period: float) -> dict[str, float]:
    reference = write(directory / "ref.h5", "ref", seconds)
    meter = write(directory / "m1.h5", "m1", seconds)
    finish(reference, ntp_period)
    steps = finish(meter, ntp_period)
    worker = AlignmentWorker()
    worker.start()
    try:
        aligned(worker, {"ref": str(directory / "ref.h5")})  # the worker's imports
        only_reference = aligned(worker, {"ref": str(directory / "ref.h5")})
        both = aligned(worker, {"ref": str(directory / "ref.h5"), "m1": str(directory / "m1.h5")})
    finally:
        worker.close()
    steps["alignment"] = both - only_reference
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--ntp-period", type=float, default=60.0)
    args = parser.parse_args()
    print(f"host: {host_load()}", flush=True)
    results = {}
    for label, seconds in (("10 s", 10.0), (f"{args.minutes:g} min", args.minutes * 60)):
        directory = Path(tempfile.mkdtemp(prefix="smartmeter-close-"))
        try:
            steps = measure(directory, seconds, args.ntp_period)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        results[label] = sum(steps.values())
        print(f"{label:>8s} of data: time model {steps['model']:.3f} s, /time rewritten "
              f"{steps['rewrite']:.3f} s, close {steps['close']:.3f} s, alignment "
              f"{steps['alignment']:.3f} s; per meter {results[label]:.3f} s", flush=True)
    long_label = f"{args.minutes:g} min"
    print(f"end of a fly per meter: {results[long_label]:.2f} s for {long_label} of data, "
          f"{results['10 s']:.3f} s for 10 s")


if __name__ == "__main__":
    main()
