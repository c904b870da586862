"""Soak: 3 meters at 8 kHz x 6 channels for ``--minutes``, one run, into the embedded catalog.

The emulated meters run in a child process (synced by the real chrony; the plan syncs each
meter's NTP every minute, §6.5).  Every ``--every`` seconds (default 10) it samples, for this
(acquisition) process and the catalog writer process: RSS and CPU over the interval; and
how far the catalog and a live SWMR reader of the first meter's HDF5 file lag behind what
the meter has delivered.  At the end: zero loss per meter (sampled = sent = received = in
the catalog, nothing declared missing), the RSS slope (MB per hour, fitted from the first
minute to the end of the data) and the mean CPU of the first and last thirds.

Usage: ``python benchmarks/soak.py --minutes 60``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from _harness import (
    Emulators,
    cpu_seconds,
    destroyed,
    host_load,
    loss_report,
    rss_mb,
    smartmeters,
)
from bluesky import RunEngine

import plans
from smartmeter_ophyd.storage import open_catalog, setup_embedded_catalog, stream_nodes


@dataclass
class Sample:
    t: float
    rss: float
    cpu: float
    writer_rss: float
    writer_cpu: float
    appended: int
    in_catalog: int
    in_file: int


class Watch:
    """The background sampler (its own catalog client, its own SWMR reader)."""

    def __init__(self, every: float, meter: Any, catalog: Any, sink: Any, frames: int = 0,
                 trace_from: float | None = None, trace_to: float | None = None) -> None:
        self.every, self.meter, self.catalog, self.sink = every, meter, catalog, sink
        self.uid: str | None = None
        self.samples: list[Sample] = []
        self.frames, self.trace_from, self.trace_to = frames, trace_from, trace_to
        self.snapshots: list[tracemalloc.Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak sampler", daemon=True)

    def doc(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.uid = doc["uid"]

    def _rows(self, client: Any) -> tuple[int, int]:
        in_catalog = in_file = 0
        if self.uid is not None and self.uid in client:
            nodes = stream_nodes(client[self.uid], self.meter.name)
            node = nodes.get(f"{self.meter.name}_time")
            in_catalog = node.shape[0] if node is not None else 0
        path = self.meter.hdf5_path
        if path:
            with h5py.File(path, "r", libver="latest", swmr=True) as f:
                in_file = int(f["time"].shape[0])
        return in_catalog, in_file

    def _run(self) -> None:
        client = open_catalog(self.catalog.profile)
        t0 = time.monotonic()
        last = (t0, cpu_seconds(), cpu_seconds(self.sink.writer_pid))
        try:
            while not self._stop.wait(self.every):
                now, cpu, wcpu = time.monotonic(), cpu_seconds(), cpu_seconds(self.sink.writer_pid)
                dt = now - last[0]
                try:
                    in_catalog, in_file = self._rows(client)
                except Exception as exc:  # a reader hiccup is a data point, not the end
                    logging.getLogger("soak").warning("reading back: %s", exc)
                    in_catalog = in_file = -1
                sample = Sample(
                    t=now - t0, rss=rss_mb(), cpu=(cpu - last[1]) / dt,
                    writer_rss=rss_mb(self.sink.writer_pid), writer_cpu=(wcpu - last[2]) / dt,
                    appended=self.meter.samples_received, in_catalog=in_catalog, in_file=in_file,
                )
                last = (now, cpu, wcpu)
                self.samples.append(sample)
                self._trace(sample.t)
                print(f"  t={sample.t:7.0f} s  acquisition RSS {sample.rss:6.1f} MB CPU "
                      f"{100 * sample.cpu:5.1f} %  writer RSS {sample.writer_rss:6.1f} MB CPU "
                      f"{100 * sample.writer_cpu:5.1f} %  m0 received {sample.appended:9d}, "
                      f"in its file (SWMR reader) {sample.in_file:9d}, in the catalog "
                      f"{sample.in_catalog:9d}", flush=True)
        finally:
            client.context.close()

    def _trace(self, t: float) -> None:
        """Two tracemalloc snapshots, at ``trace_from`` and ``trace_to`` seconds; tracing
        starts a minute before the first (not earlier: it slows arming down too much)."""
        if not self.frames or self.trace_from is None:
            return
        if not tracemalloc.is_tracing():
            if t >= self.trace_from - 60.0:
                tracemalloc.start(self.frames)
            return
        due = [self.trace_from, self.trace_to][len(self.snapshots):]
        if due and due[0] is not None and t >= due[0]:
            self.snapshots.append(tracemalloc.take_snapshot())
            print(f"  tracemalloc snapshot {len(self.snapshots)} at t={t:.0f} s: "
                  f"{tracemalloc.get_traced_memory()[0] / 1e6:.1f} MB traced", flush=True)

    def growth(self, top: int = 15) -> list[str]:
        """The largest growths between the two snapshots, by allocating line."""
        if len(self.snapshots) < 2:
            return []
        keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
        first, second = (s.filter_traces(keep) for s in self.snapshots[:2])
        out = []
        for stat in second.compare_to(first, "traceback")[:top]:
            if stat.size_diff > 0:
                where = " <- ".join(
                    f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                    for f in reversed(stat.traceback))
                out.append(f"{stat.size_diff / 1e6:+.2f} MB in {stat.count_diff:+d} blocks at "
                           f"{where}")
        return out

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def slope_mb_per_hour(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    t = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    return float(np.polyfit(t, y, 1)[0] * 3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--every", type=float, default=10.0, help="sampling period, s")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="trace Python allocations (FRAMES deep) and print what grew "
                             "between the end of the first minute and the end of the data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-soak-"))
    catalog = setup_embedded_catalog(work / "catalog", "smartmeter-soak",
                                     profiles_dir=work / "profiles")
    sink = catalog.document_sink()
    sink.wait_ready()
    seconds = args.minutes * 60
    try:
        print(f"host: {host_load()}; {args.meters} meters x 8 kHz for {seconds:.0f} s")
        with Emulators(args.meters) as emulators:
            meters = smartmeters(emulators.described, catalog)
            with destroyed(meters):
                engine = RunEngine({})
                engine.subscribe(sink)
                watch = Watch(args.every, meters[0], catalog, sink, frames=args.tracemalloc,
                              trace_from=120.0, trace_to=seconds - args.every)
                engine.subscribe(watch.doc)
                with watch:
                    (uid,) = engine(plans.synchronized_fly(meters, seconds))
                client = open_catalog(catalog.profile)
                try:
                    losses = loss_report(meters, client[uid])
                finally:
                    client.context.close()
        # after the first minute (caches warming up) and before the fly's end (closing the
        # files and the time model are one-off work, not a trend)
        samples = [s for s in watch.samples if 60 <= s.t <= seconds] or watch.samples
        third = max(1, len(samples) // 3)
        first, last = samples[:third], samples[-third:]
        print(f"host: {host_load()}")
        for loss in losses:
            print(f"  {'ok  ' if loss.zero else 'LOSS'} {loss}")
        print(f"acquisition RSS {samples[0].rss:.1f} -> {samples[-1].rss:.1f} MB, slope "
              f"{slope_mb_per_hour([(s.t, s.rss) for s in samples]):+.1f} MB/h; CPU "
              f"{100 * statistics.mean(s.cpu for s in first):.1f} % (first third) -> "
              f"{100 * statistics.mean(s.cpu for s in last):.1f} % (last third)")
        print(f"writer RSS {samples[0].writer_rss:.1f} -> {samples[-1].writer_rss:.1f} MB, slope "
              f"{slope_mb_per_hour([(s.t, s.writer_rss) for s in samples]):+.1f} MB/h; CPU "
              f"{100 * statistics.mean(s.writer_cpu for s in first):.1f} % -> "
              f"{100 * statistics.mean(s.writer_cpu for s in last):.1f} %")
        print(f"stop -> run closed: {sink.last_close_s:.2f} s")
        for line in watch.growth():
            print(f"  grew: {line}")
        print(f"zero loss: {all(loss.zero for loss in losses)}")
    finally:
        catalog.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
