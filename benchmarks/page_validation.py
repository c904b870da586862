"""What bluesky's schema validation of an event page costs per row, for the alignment stream.

At the end of a multi-meter fly the plan collects the ``alignment`` stream as one event page:
a row per window piece and break of every meter (~10 rows per meter and 10 s, ~3600 per
meter-hour).  bluesky composes it with ``event_model``'s ``ComposeEventPage``, which
validates the page against its JSON schema.  This script composes pages of the stream's own
data keys (``devices._alignment.FIELDS``) and of ``--rows`` rows, validated as bluesky does
and, as the baseline in the same run, unvalidated, best of ``--repeat``.

Last line: ``schema validation: X us per row`` (at the largest size).

Usage: ``python benchmarks/page_validation.py [--rows 100 1000 10000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import event_model
from _harness import host_load

from smartmeter_ophyd.devices._alignment import FIELDS
from smartmeter_ophyd.devices._keys import scalar_key

SAMPLE = {"string": "m1", "integer": 80, "number": 1.25e-4}


def page(rows: int) -> tuple[dict[str, list[Any]], dict[str, list[float]]]:
    now = time.time()
    data = {f"alignment_{f}": [SAMPLE[kind]] * rows for f, (kind, _, _) in FIELDS.items()}
    return data, {key: [now] * rows for key in data}


def best(compose: Any, rows: int, validate: bool, repeat: int) -> float:
    data, timestamps = page(rows)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        compose(data=data, timestamps=timestamps, validate=validate)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    keys = {f"alignment_{f}": scalar_key(f"smartmeter-ophyd/alignment/{f}", kind, numpy, units)
            for f, (kind, numpy, units) in FIELDS.items()}
    descriptor = event_model.compose_run().compose_descriptor(name="alignment", data_keys=keys)
    print(f"host: {host_load()}; {len(keys)} data keys per row", flush=True)
    per_row = 0.0
    for rows in sorted(args.rows):
        validated = best(descriptor.compose_event_page, rows, True, args.repeat)
        plain = best(descriptor.compose_event_page, rows, False, args.repeat)
        per_row = (validated - plain) / rows
        print(f"{rows:6d} rows: validated {validated:.3f} s, unvalidated {plain:.4f} s "
              f"(baseline); validation {per_row * 1e6:.0f} us per row", flush=True)
    print(f"schema validation: {per_row * 1e6:.0f} us per row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
