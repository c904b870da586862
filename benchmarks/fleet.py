"""How many meters one host records in real time: N x 8 kHz x 6 channels into the catalog.

For each N (ascending), N emulated meters run in child processes (10 per process, synced by
the real chrony), and this process flies them all in ONE ``plans.synchronized_fly`` run into
the embedded catalog (``catalog.document_sink()``: journal here, writer process there).
Per N it prints:

* zero loss: for every meter, samples sampled = sent = received (stop reply, §4.8), none
  declared missing, and as many in the catalog;
* real time: first sample -> run closed in the catalog, against ``duration + 1 s``; the first
  sample is the earliest meter's own ``start_ts`` and the last stop the latest ``stop_ts``
  (stop replies, §4.8; the meters' clocks are NTP-synced to this host's chrony), the close
  this host's clock when the RunEngine returns.  Also the RunEngine's whole wall time (NTP
  gate and scheduled start included);
* CPU: this (acquisition) process per meter (% of one core), the writer process, the
  emulators; peak thread count of this process;
* stop -> run closed (the sink's wait at the stop document);
* the CPU every process used from the last stop to the close (this one's threads, the
  alignment workers, the writer, the emulators), and the alignment workers' share: on
  ``cores`` cores the tail lasts at least that CPU / ``cores``.

The search stops at the first N that loses a sample (by default it goes to 200 meters, where
the emulators alone take a core); the largest N that also stayed in real time (and every
smaller N did) is printed before, and, if no count lost a sample, that the limit lies above
the largest tried.  The host's load is printed with the
figures: the 2 cores are shared with the emulators, the writer and whatever else runs.
Last line: ``largest N with zero loss: N``.

Usage: ``python benchmarks/fleet.py [--counts 10 20 30 40 50 60 80 100 150 200] [--seconds 10]``
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
    CpuTimeline,
    Emulators,
    Sampler,
    cpu_seconds,
    destroyed,
    host_load,
    loss_report,
    smartmeters,
)
from bluesky import RunEngine

import plans
from smartmeter_ophyd.storage import open_catalog, setup_embedded_catalog


def fly_fleet(
    engine: RunEngine, count: int, seconds: float, catalog: Any, sink: Any, flush_period: float
) -> dict[str, Any]:
    """One count's fly on ``engine`` (one RunEngine for all counts, as in a user's session:
    each RunEngine keeps a thread of its own)."""
    with Emulators(count) as emulators:
        meters = smartmeters(emulators.described, catalog)
        with destroyed(meters):
            marks: dict[str, float] = {}

            def stop_mark(name: str, doc: dict[str, Any]) -> None:
                if name == "stop":
                    marks["stop_wall"] = time.time()

            # before the sink, which waits at the stop for the writer
            tokens = [engine.subscribe(stop_mark), engine.subscribe(sink)]
            emu_cpu0 = sum(cpu_seconds(pid) for pid in emulators.pids)
            writer_cpu0 = cpu_seconds(sink.writer_pid)
            cpu0, t0 = cpu_seconds(), time.monotonic()
            with Sampler() as sampler, CpuTimeline(period=0.1) as timeline:
                (uid,) = engine(plans.synchronized_fly(meters, seconds, flush_period=flush_period))
            t_end, t_end_wall = time.monotonic(), time.time()
            for token in tokens:
                engine.unsubscribe(token)
            cpu = cpu_seconds() - cpu0
            writer_cpu = cpu_seconds(sink.writer_pid) - writer_cpu0
            emu_cpu = sum(cpu_seconds(pid) for pid in emulators.pids) - emu_cpu0
            client = open_catalog(catalog.profile)
            try:
                losses = loss_report(meters, client[uid])
            finally:
                client.context.close()
    # the meters' own start and stop instants (their clocks are NTP-synced to this host's)
    summaries = [m.last_summary for m in meters if m.last_summary is not None]
    started = min(summary.start_ts for summary in summaries)
    stopped = max(summary.stop_ts for summary in summaries)
    recording = t_end_wall - started
    tail_cpu = timeline.used(stopped, t_end_wall)
    return {
        "tail_cpu_s": sum(tail_cpu.values()),
        "tail_alignment_cpu_s": tail_cpu.get("alignment workers", 0.0),
        "sampling_s": stopped - started,
        "tail_s": marks["stop_wall"] - stopped,
        "count": count,
        "losses": losses,
        "zero_loss": all(loss.zero for loss in losses),
        "recording_s": recording,
        "real_time": recording <= seconds + 1.0,
        "wall_s": t_end - t0,
        "cpu_per_meter": cpu / count / (t_end - t0),
        "cpu_s": cpu,
        "writer_cpu_s": writer_cpu,
        "emulator_cpu_s": emu_cpu,
        "threads": sampler.peak_threads,
        "close_s": sink.last_close_s,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 20, 30, 40, 50, 60, 80, 100, 150, 200])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flush-period", type=float, default=0.5)
    parser.add_argument("--keep", action="store_true", help="keep the catalog directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-fleet-"))
    catalog = setup_embedded_catalog(work / "catalog", "smartmeter-fleet",
                                     profiles_dir=work / "profiles")
    sink = catalog.document_sink()
    sink.wait_ready()
    engine = RunEngine({})
    largest = largest_real_time = real_time = 0
    lost = False
    try:
        print(f"host: {host_load()}")
        for count in sorted(args.counts):
            r = fly_fleet(engine, count, args.seconds, catalog, sink, args.flush_period)
            print(
                f"N={count:3d}: zero loss {r['zero_loss']}, first sample -> run closed "
                f"{r['recording_s']:.2f} s for {args.seconds:g} s of data "
                f"(real time: {r['real_time']}: sampling {r['sampling_s']:.2f} s, last meter "
                f"stopped -> stop document {r['tail_s']:.2f} s, stop -> closed "
                f"{r['close_s']:.2f} s; CPU from the last stop to the close "
                f"{r['tail_cpu_s']:.2f} s, {r['tail_alignment_cpu_s']:.2f} s of it alignment), "
                f"RE wall {r['wall_s']:.2f} s; "
                f"acquisition CPU {r['cpu_s']:.1f} s = {100 * r['cpu_per_meter']:.1f} % of a "
                f"core per meter; writer {r['writer_cpu_s']:.1f} s, emulators "
                f"{r['emulator_cpu_s']:.1f} s CPU; peak threads {r['threads']}; {host_load()}",
                flush=True,
            )
            for loss in r["losses"]:
                if not loss.zero:
                    print(f"    LOSS {loss}")
            if not r["zero_loss"]:
                lost = True
                break
            largest = count
            if r["real_time"] and real_time == largest_real_time:
                largest_real_time = count
            real_time = count
    finally:
        catalog.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"largest N in real time (first sample -> closed <= duration + 1 s), all smaller "
          f"ones too: {largest_real_time}")
    if not lost and largest:
        print(f"no count lost a sample: the limit lies above {largest}, the largest tried")
    print(f"largest N with zero loss: {largest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
