"""The end of a long multi-meter run's ``alignment`` stream: pages as results come, against
one page at the end.

At the end of a multi-meter fly the alignment workers align each meter's recording against
the reference, and the RunEngine collects the ``alignment`` stream; bluesky composes each
event page and validates it against its JSON schema (~0.2 ms per row, a row per meter and
second: ``page_validation.py``).  ``AlignmentStream.collect_pages`` pages what the workers
have sent each time it comes, so the RunEngine validates those rows while the workers align
the next meters.  The baseline, in the same run, is the same stream collected as one page
once every result is in (what the stream did before).

``--meters`` recordings of ``--minutes`` of 8 kHz are written as the I/O thread's files hold
them (float64 ``/time`` and float32 ``v_l1``, Blosc2), with a 50 Hz voltage, each meter with
its own clock offset and drift.  Each variant runs a RunEngine plan (no subscribers): open a
run, collect the stream (workers launched beforehand, as a fly launches them while the meters
sample), close the run; timed from the request to the workers to the run's close.  The
variants alternate, ``--repeat`` times each.

Last line: ``alignment stream of N meters x M min: X s (one page at the end: Y s)`` (medians).

Usage: ``python benchmarks/alignment_stream.py [--meters 8] [--minutes 10] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import h5py
import hdf5plugin
import numpy as np
from _harness import host_load
from bluesky import RunEngine
from bluesky.utils import Msg

from smartmeter_ophyd.devices import AlignmentStream
from smartmeter_ophyd.devices._alignment import _page

RATE = 8000
START = 1_750_000_000.25
PIECE_S = 60


def record(path: Path, offset_s: float, drift_ppm: float, seconds: float, seed: int) -> str:
    """A recording as the writer stores it: the meter stamps ``start + n / rate`` on its own
    clock, which runs ``drift_ppm`` fast and ``offset_s`` ahead of true time."""
    rng = np.random.default_rng(seed)
    blosc = hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE)
    n = int(seconds * RATE)
    with h5py.File(path, "w", libver="latest") as f:
        times = f.create_dataset("time", (n,), dtype="<f8", chunks=(16384,), **blosc)
        volts = f.create_dataset("v_l1", (n,), dtype="<f4", chunks=(16384,), **blosc)
        for lo in range(0, n, PIECE_S * RATE):
            j = np.arange(lo, min(n, lo + PIECE_S * RATE))
            stamped = j / RATE
            true = (stamped - offset_s) / (1 + drift_ppm * 1e-6)
            times[j[0]:j[-1] + 1] = START + stamped
            volts[j[0]:j[-1] + 1] = (325 * np.sin(2 * math.pi * 50 * true)
                                     + rng.normal(0, 0.05, j.size)).astype(np.float32)
    return str(path)


class OnePageAtTheEnd(AlignmentStream):
    """The baseline: every result first, then one page."""

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        page = _page(self.compute())
        if page is not None:
            yield page


def collect(stream: AlignmentStream, clock: dict[str, float]) -> Generator[Msg, Any, None]:
    @bpp.run_decorator()
    def inner() -> Generator[Msg, Any, None]:
        yield from bps.declare_stream(stream, name=stream.name, collect=True)
        clock["asked"] = time.perf_counter()
        stream.start()
        yield Msg("collect", stream, stream=False, return_payload=False, name=stream.name)

    yield from inner()


def run_once(kind: type[AlignmentStream], files: dict[str, str]) -> float:
    meters = [SimpleNamespace(name=name, hdf5_path=path) for name, path in files.items()]
    stream = kind(meters)  # type: ignore[arg-type]
    stream.open()
    time.sleep(1.0)  # the workers' imports, done while a fly's meters sample
    clock: dict[str, float] = {}
    engine = RunEngine({}, call_returns_result=True)
    try:
        engine(collect(stream, clock))
        return time.perf_counter() - clock["asked"]
    finally:
        stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="smartmeter-alignment-stream-"))
    try:
        files = {f"m{k}": record(directory / f"m{k}.h5", offset_s=k * 3e-4,
                                 drift_ppm=(k % 5 - 2) * 10.0, seconds=args.minutes * 60,
                                 seed=k)
                 for k in range(args.meters)}
        print(f"host: {host_load()}; {args.meters} meters x {args.minutes:g} min written",
              flush=True)
        took: dict[str, list[float]] = {"pages": [], "one": []}
        for _ in range(args.repeat):
            for label, kind in (("pages", AlignmentStream), ("one", OnePageAtTheEnd)):
                seconds = run_once(kind, files)
                took[label].append(seconds)
                print(f"  {'pages as results come' if label == 'pages' else 'one page at the end':24s}"
                      f" {seconds:.2f} s", flush=True)
        print(f"host: {host_load()}")
        print(f"alignment stream of {args.meters} meters x {args.minutes:g} min: "
              f"{statistics.median(took['pages']):.2f} s (one page at the end: "
              f"{statistics.median(took['one']):.2f} s)")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
