"""Threads of the acquisition process during flies of 1 and of N meters.

The emulated meters run in a CHILD process (``python -m smartmeter_ophyd.emulator``), so
``threading.enumerate()`` here counts only what the device, client and RunEngine use.  Each
case flies its meters at 8 kHz x 6 channels in one RunEngine run (one stream per meter, no
catalog), samples the thread count every 50 ms while the fly runs, and prints the peak and
the threads by name.  The baseline is the 1-meter fly, measured in the same run.

Last line: ``threads per extra meter: X`` = (peak(N) - peak(1)) / (N - 1).  Target X <= 0.2:
the count does not grow with the number of meters.

Usage: ``python benchmarks/fly_threads.py --meters 10 --seconds 2``
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Sequence
from typing import Any

import bluesky.plan_stubs as bps
from bluesky import RunEngine
from bluesky.utils import Msg, short_uid

from smartmeter_ophyd.devices import FlyConfig, SmartMeter


def start_emulators(count: int) -> tuple[subprocess.Popen[str], list[dict[str, Any]]]:
    child = subprocess.Popen(
        [sys.executable, "-m", "smartmeter_ophyd.emulator", "--count", str(count),
         "--no-serial", "--no-truth", "--boot-delay", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    return child, [json.loads(child.stdout.readline()) for _ in range(count)]


def fly(meters: Sequence[SmartMeter]) -> Generator[Msg, Any, None]:
    yield from bps.open_run()
    for meter in meters:
        yield from bps.declare_stream(meter, name=meter.name, collect=True)
    yield from bps.kickoff_all(*meters, wait=True)
    group = short_uid("complete")
    yield from bps.complete_all(*meters, group=group, wait=False)
    done = False
    while not done:
        done = yield from bps.wait(group=group, timeout=0.5, error_on_timeout=False)
        for meter in meters:
            yield from bps.collect(meter, name=meter.name, return_payload=False)
    yield from bps.close_run()


def measure(count: int, seconds: float, directory: str) -> tuple[int, collections.Counter[str]]:
    child, described = start_emulators(count)
    meters: list[SmartMeter] = []
    try:
        meters = [
            SmartMeter(d["host"], d["command_port"], name=f"m{i}", data_directory=directory)
            for i, d in enumerate(described)
        ]
        for meter in meters:
            meter.connect()
            meter.prepare(FlyConfig(rate=8000, duration_s=seconds))
        engine = RunEngine({})
        peak = 0
        names: collections.Counter[str] = collections.Counter()
        running = threading.Event()
        running.set()

        def sample_threads() -> None:
            nonlocal peak, names
            while running.is_set():
                alive = [t for t in threading.enumerate() if t is not sampler]
                if len(alive) > peak:
                    peak = len(alive)
                    names = collections.Counter(t.name.rstrip("0123456789_-") for t in alive)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_threads, name="benchmark sampler")
        sampler.start()
        try:
            engine(fly(meters))
        finally:
            running.clear()
            sampler.join()
        for meter in meters:
            summary = meter.last_summary
            assert summary is not None and summary.explained, summary
        return peak, names
    finally:
        for meter in meters:
            meter.destroy()
        child.terminate()
        child.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the meters have no time server: startTs 0
    with tempfile.TemporaryDirectory() as directory:
        results = {n: measure(n, args.seconds, directory) for n in (1, args.meters)}
    for n, (peak, names) in results.items():
        by_name = ", ".join(f"{name or '?'} x{k}" for name, k in sorted(names.items()))
        print(f"{n:3d} meter(s): peak {peak} threads ({by_name})")
    extra = (results[args.meters][0] - results[1][0]) / (args.meters - 1)
    print(f"threads per extra meter: {extra:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
