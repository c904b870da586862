"""CPU cost of the emulator's physical model: ``SamplingEngine.produce`` at 8 kHz x 6 channels.

Simulates ``--meters`` meters for ``--seconds`` of (virtual) true time, calling ``produce``
``--calls`` times per second each, as the emulator server does, and prints the CPU time per
meter-second.  No sockets and no real waiting: this measures the model alone.

    .venv/bin/python benchmarks/emulator_model.py --meters 8 --seconds 20 --calls 50
"""

from __future__ import annotations

import argparse
import time

from smartmeter_ophyd.emulator._clock import MeterClock
from smartmeter_ophyd.emulator._grid import GridModel
from smartmeter_ophyd.emulator._sampling import SamplingEngine
from smartmeter_ophyd.protocol import Measures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--calls", type=int, default=50, help="produce() calls per second")
    parser.add_argument("--rate", type=int, default=8000)
    args = parser.parse_args()

    start = 1_750_000_000.25
    grid = GridModel(seed=1)
    engines = []
    for n in range(args.meters):
        clock = MeterClock(0.001 * n, 5.0 * n, anchor_true=start)
        engine = SamplingEngine(grid, clock, circuit=n % 4, noise_seed=n, keep_truth=False,
                                name=f"bench-{n}")
        engine.start(Measures.VI, args.rate, at_true=start)
        engines.append(engine)

    steps = int(args.seconds * args.calls)
    rows = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(1, steps + 1):
        now = start + step / args.calls
        for engine in engines:
            rows += engine.produce(now).shape[0]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    meter_seconds = args.meters * args.seconds
    print(f"{args.meters} meters x {args.seconds:g} s at {args.rate} Hz x 6, "
          f"{args.calls} produce() calls/s: {rows} rows")
    print(f"CPU {cpu * 1e3 / meter_seconds:.2f} ms per meter-second "
          f"(wall {wall * 1e3 / meter_seconds:.2f} ms); "
          f"one core fits ~{meter_seconds / cpu:.0f} meters")


if __name__ == "__main__":
    main()
