"""A long run with drifting clocks: stored times stay on the truth from start to end.

Two emulated meters whose ADE sample crystals run at -50 and +50 ppm and whose RTCs run at
-20 and +20 ppm (no network jitter; the fleet's own time server), recorded by
``plans.synchronized_fly`` with an NTP sync every 60 s (§6.5: the firmware corrects at most
10 samples per sync, far less than the drift).  For every stored sample the error is the
stored time minus the instant the emulator really took it; the baseline in the same run is
the nominal model ``start_ts + index / rate``.  Prints the error per minute (first and last
minute included, where the time model has the least to go on), then last
``drift run max error: X ms`` (goal X <= 1; the nominal model should exceed 25 ms).

Usage: ``python benchmarks/drift.py --minutes 10``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from timing import record  # benchmarks/timing.py, the same recording path

CLOCKS = (
    {"ade_drift_ppm": -50.0, "rtc_drift_ppm": -20.0, "network_jitter_s": 0.0},
    {"ade_drift_ppm": 50.0, "rtc_drift_ppm": 20.0, "network_jitter_s": 0.0},
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--ntp-period", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as directory:
        results, _ = record(args.minutes * 60, args.ntp_period, CLOCKS, Path(directory))
    worst = 0.0
    for r in results:
        err = np.abs(r.error)
        nominal = np.abs(r.nominal - r.true)
        minute = ((r.stored - r.stored[0]) // 60).astype(int)
        per_minute = [f"{err[minute == m].max() * 1e3:.2f}" for m in range(minute.max() + 1)]
        print(f"{r.name}: max error per minute (ms): {', '.join(per_minute)}")
        print(f"{r.name}: stored max {err.max() * 1e3:.3f} ms, p99 "
              f"{np.percentile(err, 99) * 1e3:.3f} ms; nominal model max "
              f"{nominal.max() * 1e3:.1f} ms; NTP confidence {r.confidence_s * 1e3:.0f} ms")
        worst = max(worst, float(err.max()))
    print(f"drift run max error: {worst * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
