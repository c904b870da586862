"""Where a run's time goes beyond its data: N meters, one synchronized_fly, three writers.

Emulated meters (8 kHz x 6 channels) run in child processes, synced by the real chrony.
Each case flies them with ``plans.synchronized_fly(meters, --seconds, start_in=0)`` (each
meter starts at its kickoff) and records, from the RunEngine's messages and documents:

* ``wall``: ``RE(plan)`` from call to return; ``overhead`` = wall - the fly's duration;
* ``gate``: call -> ``open_run`` (the NTP gate and the settings);
* ``kickoff``: kickoff messages -> the release wait done, i.e. the first sample of every
  meter (the device's kickoff completes on it);
* ``data``: release -> the stop document (the duration, the meter's tail (§4.8), the last
  collects and records);
* ``stop -> closed``: the stop document emitted -> the run closed in the catalog.  For the
  sink it is its stop handling (the journal's fsync and the wait for the writer process,
  which works meanwhile) and the writer's CPU in that window (on a shared host the wall time
  is that CPU stretched by contention); for ``TiledWriter`` its
  stop handling (it writes synchronously); for ``none`` nothing is written;
* CPU of this process.

Writers: ``none`` (no catalog), ``tiled`` (``make_tiled_writer(catalog.client)``: a
TiledWriter over the in-process Tiled app - what this project did before), ``sink``
(``catalog.document_sink()``: journal here, writer process there - the default now).
A last case flies with a scheduled start (``start_in=None``) and the sink and reports the
first sample's latency after the scheduled instant ``T`` (the synchronization record's
``scheduled_start``).

Last line: ``stop to run closed, 10 meters: X s`` (the sink).  Targets: <= 0.5 s, and an
overhead beyond the duration <= 1 s.

``--keep-journal DIR`` copies the sink's run journals to DIR (``<run uid>.docs``, for
``benchmarks/writer_stop.py``).

Usage: ``python benchmarks/run_overhead.py --meters 2 10 --seconds 2 [--keep-journal DIR]``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import (
    Emulators,
    Marks,
    StopTimed,
    cpu_seconds,
    destroyed,
    host_load,
    smartmeters,
)
from bluesky import RunEngine

import plans
from smartmeter_ophyd.storage import make_tiled_writer, setup_embedded_catalog


def fly_once(
    meters: Sequence[Any], seconds: float, writer: str, catalog: Any, start_in: float | None
) -> dict[str, float]:
    engine = RunEngine({})
    marks = Marks()
    engine.msg_hook = marks.msg
    engine.subscribe(marks.doc)  # first: it sees the stop document before any writer
    timed = StopTimed(make_tiled_writer(catalog.client)) if writer == "tiled" else None
    sink = None
    if timed is not None:
        engine.subscribe(timed)
    elif writer == "sink":
        sink = catalog.document_sink()
        engine.subscribe(sink)
        marks.writer_pid = sink.writer_pid
    cpu0, t0 = cpu_seconds(), time.monotonic()
    engine(plans.synchronized_fly(meters, seconds, start_in=start_in))
    t_end = time.monotonic()
    t = marks.t
    close = close_cpu = 0.0
    if writer == "sink":
        assert sink is not None and sink.last_close_s is not None
        close = sink.last_close_s
        close_cpu = cpu_seconds(sink.writer_pid) - marks.writer_cpu
    elif timed is not None:
        close = timed.stop_handling[0]
    out = {
        "wall": t_end - t0,
        "overhead": t_end - t0 - seconds,
        "gate": t["open_run"] - t0,
        "kickoff": t["released"] - t["kickoff"],
        "data": t["stop"] - t["released"],
        "close": close,
        "close_cpu": close_cpu,
        "cpu": cpu_seconds() - cpu0,
    }
    if marks.scheduled_start is not None and marks.release_wall is not None:
        out["first_sample_after_T"] = marks.release_wall - marks.scheduled_start
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--writers", nargs="+", default=["none", "tiled", "sink"],
                        choices=["none", "tiled", "sink"])
    parser.add_argument("--keep-journal", type=Path, metavar="DIR",
                        help="copy the sink's run journals here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-overhead-"))
    catalog = setup_embedded_catalog(work / "catalog", "smartmeter-overhead",
                                     profiles_dir=work / "profiles")
    if "sink" in args.writers:
        catalog.document_sink(keep_journals=args.keep_journal is not None).wait_ready()
    results: dict[tuple[int, str], dict[str, float]] = {}
    try:
        print(f"host: {host_load()}")
        with Emulators(max(args.meters)) as emulators:
            meters_all = smartmeters(emulators.described, catalog)
            with destroyed(meters_all):
                for count in sorted(args.meters):
                    for writer in args.writers:
                        r = fly_once(meters_all[:count], args.seconds, writer, catalog, 0)
                        results[(count, writer)] = r
                        print(
                            f"{count:3d} meters, {writer:5}: wall {r['wall']:6.2f} s "
                            f"(overhead {r['overhead']:5.2f} s beyond {args.seconds:g} s): gate "
                            f"{r['gate']:.2f}, kickoff -> first samples {r['kickoff']:.3f}, "
                            f"data {r['data']:.2f}, stop -> closed {r['close']:.3f} s"
                            + (f" (writer CPU {r['close_cpu']:.3f} s)" if writer == "sink" else "")
                            + "; "
                            f"CPU {r['cpu']:.2f} s; {host_load()}",
                            flush=True,
                        )
                if "sink" in args.writers:
                    count = max(args.meters)
                    r = fly_once(meters_all[:count], args.seconds, "sink", catalog, None)
                    after = r.get("first_sample_after_T", float("nan"))
                    print(f"{count:3d} meters, sink, scheduled start: wall {r['wall']:.2f} s, "
                          f"every meter's first sample {1e3 * after:.0f} ms after the "
                          f"scheduled instant T; stop -> closed {r['close']:.3f} s (writer CPU "
                          f"{r['close_cpu']:.3f} s)", flush=True)
    finally:
        catalog.close()
        if args.keep_journal is not None:
            args.keep_journal.mkdir(parents=True, exist_ok=True)
            for journal in catalog.journal_directory.glob("*/closed/*.docs"):
                shutil.copy(journal, args.keep_journal / journal.name)
        shutil.rmtree(work, ignore_errors=True)
    if "sink" in args.writers:
        last = results[(max(args.meters), "sink")]
        print(f"stop to run closed, {max(args.meters)} meters: {last['close']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
