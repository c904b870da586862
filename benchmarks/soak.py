"""Soak: 3 meters at 8 kHz x 6 channels for ``--minutes``, one run, into the embedded catalog.

The emulated meters run in a child process (synced by the real chrony; the plan syncs each
meter's NTP every minute, §6.5).  Every ``--every`` seconds (default 10) it samples, for this
(acquisition) process and the catalog writer process: RSS and CPU over the interval; and
how far the catalog and a live SWMR reader of the first meter's HDF5 file lag behind what
the meter has delivered.  At the end: zero loss per meter (sampled = sent = received = in
the catalog, nothing declared missing), the RSS slope of both processes (MB per hour, fitted
from the first minute to the last sample while the meters streamed, and over the second half
of that span alone; a slope within two standard errors of zero is reported as flat with its
bound) and the mean CPU of the first and last thirds.

Where the memory is (``--diagnose``, :mod:`_memory`): RSS by kind of mapping for both
processes, and for this one glibc's malloc (in use / free in its arenas) and pymalloc's arenas
and blocks; ``--trim`` (diagnostic only) calls ``malloc_trim(0)`` after each sample;
``--collect`` (diagnostic only) runs a full ``gc.collect()`` before each sample, so that what
it measures is reachable (growth without it but not with it is garbage in reference cycles
awaiting the collector's next full pass, not a leak);
``--types`` counts objects by type; ``--tracemalloc`` diffs Python allocations.  The sampler's
read-back (a catalog client and a SWMR reader) runs in a child process, so its memory is not
counted as the acquisition's; ``--no-read-back`` leaves it out.

Usage: ``python benchmarks/soak.py --minutes 60``
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _memory
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
    maps: dict[str, float] = field(default_factory=dict)
    writer_maps: dict[str, float] = field(default_factory=dict)
    malloc: _memory.Mallinfo | None = None
    trimmed_rss: float | None = None
    traced: float | None = None
    pymalloc: tuple[float, float] | None = None


def read_back(conn: Any, profile: str, tiled_profiles: str, profiles_dir: str) -> None:
    """The sampler's reader, in a child process: for each (run uid, meter, HDF5 path) asked,
    the rows of the meter's time in the catalog and in its file (a SWMR reader); an
    exception's text if it could not read them."""
    os.environ["TILED_PROFILES"] = os.pathsep.join(p for p in (tiled_profiles, profiles_dir) if p)
    client = open_catalog(profile)
    try:
        while (request := conn.recv()) is not None:
            uid, name, path = request
            try:
                in_catalog = in_file = 0
                if uid is not None and uid in client:
                    node = stream_nodes(client[uid], name).get(f"{name}_time")
                    in_catalog = node.shape[0] if node is not None else 0
                if path:
                    with h5py.File(path, "r", libver="latest", swmr=True) as f:
                        in_file = int(f["time"].shape[0])
                conn.send((in_catalog, in_file))
            except Exception as exc:  # a reader hiccup is a data point, not the end
                conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        client.context.close()


class Watch:
    """The background sampler (its own catalog client, its own SWMR reader)."""

    def __init__(self, every: float, meter: Any, catalog: Any, sink: Any, frames: int = 0,
                 trace_from: float | None = None, trace_to: float | None = None,
                 diagnose: bool = False, trim: bool = False, collect: bool = False,
                 types_every: float = 0.0,
                 read_back: bool = True, profiles_dir: Path | None = None) -> None:
        self.every, self.meter, self.catalog, self.sink = every, meter, catalog, sink
        self.profiles_dir = profiles_dir
        self.uid: str | None = None
        self.samples: list[Sample] = []
        self.diagnose, self.trim, self.read_back = diagnose, trim, read_back
        self.collect = collect
        self.types_every = types_every
        self.types: list[tuple[float, collections.Counter[str]]] = []
        self.frames, self.trace_from, self.trace_to = frames, trace_from, trace_to
        self.snapshots: list[tracemalloc.Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak sampler", daemon=True)

    def doc(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.uid = doc["uid"]

    def _rows(self, reader: Any) -> tuple[int, int]:
        if reader is None:
            return 0, 0
        reader.send((self.uid, self.meter.name, self.meter.hdf5_path))
        answer = reader.recv()
        if isinstance(answer, str):
            raise RuntimeError(answer)
        return answer

    def _run(self) -> None:
        reader = process = None
        if self.read_back:  # in a child process: its memory is not the acquisition's
            context = multiprocessing.get_context("spawn")
            reader, child = context.Pipe()
            process = context.Process(
                target=read_back, name="soak read-back", daemon=True,
                args=(child, self.catalog.profile, os.environ.get("TILED_PROFILES", ""),
                      str(self.profiles_dir)))
            process.start()
        t0 = time.monotonic()
        last = (t0, cpu_seconds(), cpu_seconds(self.sink.writer_pid))
        try:
            while not self._stop.wait(self.every):
                now, cpu, wcpu = time.monotonic(), cpu_seconds(), cpu_seconds(self.sink.writer_pid)
                dt = now - last[0]
                if self.collect:
                    gc.collect()
                try:
                    in_catalog, in_file = self._rows(reader)
                except Exception as exc:  # a reader hiccup is a data point, not the end
                    logging.getLogger("soak").warning("reading back: %s", exc)
                    in_catalog = in_file = -1
                sample = Sample(
                    t=now - t0, rss=rss_mb(), cpu=(cpu - last[1]) / dt,
                    writer_rss=rss_mb(self.sink.writer_pid), writer_cpu=(wcpu - last[2]) / dt,
                    appended=self.meter.samples_received, in_catalog=in_catalog, in_file=in_file,
                )
                if self.diagnose:
                    sample.maps = _memory.mappings()
                    sample.writer_maps = _memory.mappings(self.sink.writer_pid)
                    sample.malloc = _memory.mallinfo()
                    sample.pymalloc = _memory.pymalloc()
                    if tracemalloc.is_tracing():
                        sample.traced = tracemalloc.get_traced_memory()[0] / 1e6
                if self.trim:
                    _memory.malloc_trim()
                    sample.trimmed_rss = rss_mb()
                last = (now, cpu, wcpu)
                self.samples.append(sample)
                self._trace(sample.t)
                self._count_types(sample.t)
                print(f"  t={sample.t:7.0f} s  acquisition RSS {sample.rss:6.1f} MB CPU "
                      f"{100 * sample.cpu:5.1f} %  writer RSS {sample.writer_rss:6.1f} MB CPU "
                      f"{100 * sample.writer_cpu:5.1f} %  m0 received {sample.appended:9d}, "
                      f"in its file (SWMR reader) {sample.in_file:9d}, in the catalog "
                      f"{sample.in_catalog:9d}", flush=True)
                if self.diagnose:
                    print(f"    {_describe(sample)}", flush=True)
        finally:
            if process is not None:
                reader.send(None)
                process.join(30)

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

    def _count_types(self, t: float) -> None:
        """gc-tracked objects by type every ``types_every`` s from the first minute on."""
        if not self.types_every or t < 60.0:
            return
        if self.types and t - self.types[-1][0] < self.types_every:
            return
        self.types.append((t, _memory.type_counts()))

    def type_growth(self, top: int = 12) -> list[str]:
        """The object types whose count grew most between the first and the last count."""
        if len(self.types) < 2:
            return []
        (t0, first), (t1, last) = self.types[0], self.types[-1]
        diff = last.copy()
        diff.subtract(first)
        return [f"{name}: {first[name]} -> {last[name]} ({n:+d} in {t1 - t0:.0f} s)"
                for name, n in diff.most_common(top) if n > 0]

    def growth(self, top: int = 15) -> list[str]:
        """The largest growths between the two snapshots, by allocating line."""
        if len(self.snapshots) < 2:
            return []
        keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
        first, second = (s.filter_traces(keep) for s in self.snapshots[:2])
        out = []
        for stat in second.compare_to(first, "filename")[:top]:
            if stat.size_diff > 0:
                out.append(f"{stat.size_diff / 1e6:+.2f} MB in {stat.count_diff:+d} blocks in "
                           f"{stat.traceback[0].filename}")
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


def _describe(sample: Sample) -> str:
    """One line of where the memory of both processes is (``--diagnose``)."""
    m, w, info = sample.maps, sample.writer_maps, sample.malloc
    text = (f"acquisition heap {m['heap']:.1f} anon {m['anon']:.1f} lib {m['lib']:.1f} files "
            f"{m['files']:.1f} MB")
    if info is not None:
        text += (f"; malloc arenas {info.arena:.1f} (in use {info.in_use:.1f}, free "
                 f"{info.free:.1f}) mmapped {info.mmapped:.1f} MB")
    if sample.pymalloc is not None:
        text += (f"; pymalloc arenas {sample.pymalloc[0]:.1f} (blocks "
                 f"{sample.pymalloc[1]:.1f}) MB")
    if sample.trimmed_rss is not None:
        text += f"; RSS after malloc_trim {sample.trimmed_rss:.1f} MB"
    if sample.traced is not None:
        text += f"; traced by tracemalloc {sample.traced:.1f} MB"
    return text + (f" | writer heap {w['heap']:.1f} anon {w['anon']:.1f} lib {w['lib']:.1f} "
                   f"files {w['files']:.1f} MB")


def slope_mb_per_hour(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (seconds, MB) in MB/h and its standard error (nan: too few)."""
    if len(points) < 3:
        return float("nan"), float("nan")
    t = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    (slope, _), cov = np.polyfit(t, y, 1, cov="unscaled")
    residual = y - np.polyval((slope, _), t)
    variance = float(residual @ residual) / (len(t) - 2)
    return float(slope * 3600), float(np.sqrt(cov[0, 0] * variance) * 3600)


def slopes(points: Sequence[tuple[float, float]], half: float) -> str:
    """The slope over all ``points`` and over those from ``half`` s on, each with its 2-sigma
    bound; a slope within its bound is reported as flat, with the bound."""
    def one(part: Sequence[tuple[float, float]]) -> str:
        slope, error = slope_mb_per_hour(part)
        if not np.isfinite(slope):
            return "n/a (too few samples)"
        if abs(slope) <= 2 * error:
            return f"flat ({slope:+.1f} MB/h, |slope| < {abs(slope) + 2 * error:.1f} MB/h)"
        return f"{slope:+.1f} ± {2 * error:.1f} MB/h"
    second = [p for p in points if p[0] >= half]
    return f"overall {one(points)}, second half {one(second)}"


def diagnosis(samples: Sequence[Sample], half: float) -> list[str]:
    """The slope of each kind of memory sampled (``--diagnose``, ``--trim``)."""
    out = []
    if samples[0].maps:
        for who, key in (("acquisition", "maps"), ("writer", "writer_maps")):
            for kind in _memory.KINDS:
                series = [(s.t, getattr(s, key)[kind]) for s in samples]
                out.append(f"{who} {kind}: {series[0][1]:.1f} -> {series[-1][1]:.1f} MB, "
                           f"{slopes(series, half)}")
    if samples[0].malloc is not None:
        for name in ("arena", "in_use", "free", "mmapped"):
            series = [(s.t, getattr(s.malloc, name)) for s in samples]
            out.append(f"acquisition malloc {name}: {series[0][1]:.1f} -> {series[-1][1]:.1f} "
                       f"MB, {slopes(series, half)}")
    if samples[0].pymalloc is not None:
        for k, name in enumerate(("arenas", "blocks")):
            series = [(s.t, s.pymalloc[k] if s.pymalloc else 0.0) for s in samples]
            out.append(f"acquisition pymalloc {name}: {series[0][1]:.1f} -> "
                       f"{series[-1][1]:.1f} MB, {slopes(series, half)}")
    traced = [(s.t, s.traced) for s in samples if s.traced is not None]
    if len(traced) > 2:
        out.append(f"acquisition Python (tracemalloc): {traced[0][1]:.1f} -> {traced[-1][1]:.1f} "
                   f"MB, {slopes(traced, half)}")
    if samples[0].trimmed_rss is not None:
        series = [(s.t, s.trimmed_rss or 0.0) for s in samples]
        out.append(f"acquisition RSS after malloc_trim: {series[0][1]:.1f} -> "
                   f"{series[-1][1]:.1f} MB, {slopes(series, half)}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--every", type=float, default=10.0, help="sampling period, s")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="trace Python allocations (FRAMES deep) and print what grew "
                             "between the end of the first minute and the end of the data")
    parser.add_argument("--diagnose", action="store_true",
                        help="also sample both processes' memory by kind of mapping (heap, "
                             "anon, libraries, files) and this process's malloc (mallinfo2), "
                             "and report the slope of each")
    parser.add_argument("--trim", action="store_true",
                        help="diagnostic: malloc_trim(0) after every sample and record the RSS "
                             "left (what it returns was free memory glibc kept, not a leak)")
    parser.add_argument("--collect", action="store_true",
                        help="diagnostic: a full gc.collect() before every sample (what grows "
                             "then is reachable, not garbage awaiting the collector)")
    parser.add_argument("--types", type=float, default=0.0, metavar="SECONDS",
                        help="count gc-tracked objects by type every SECONDS from the first "
                             "minute on and print the types that grew")
    parser.add_argument("--ntp-period", type=float, default=60.0, metavar="SECONDS",
                        help="the plan's periodic NTP sync (its default: 60 s; 0: none)")
    parser.add_argument("--no-read-back", action="store_true",
                        help="no read-back process (no catalog or SWMR lag figures)")
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
                              trace_from=120.0, trace_to=seconds - args.every,
                              diagnose=args.diagnose, trim=args.trim, collect=args.collect,
                              types_every=args.types,
                              read_back=not args.no_read_back,
                              profiles_dir=work / "profiles")
                engine.subscribe(watch.doc)
                with watch:
                    (uid,) = engine(plans.synchronized_fly(
                        meters, seconds, ntp_period=args.ntp_period or None))
                returned = time.time()
                last_stop = max((m.last_summary.stop_ts for m in meters
                                 if m.last_summary is not None and m.last_summary.stop_ts),
                                default=math.nan)
                received = meters[0].samples_received
                client = open_catalog(catalog.profile)
                try:
                    losses = loss_report(meters, client[uid])
                finally:
                    client.context.close()
        # after the first minute (caches warming up) and before the fly's end (closing the
        # files and the time model are one-off work, not a trend): while m0 still streamed
        streaming = [s for s in watch.samples if 60 <= s.t <= seconds]
        while len(streaming) > 1 and streaming[-1].appended == received:
            streaming.pop()
        samples = streaming or watch.samples
        third = max(1, len(samples) // 3)
        first, last = samples[:third], samples[-third:]
        print(f"host: {host_load()}")
        for loss in losses:
            print(f"  {'ok  ' if loss.zero else 'LOSS'} {loss}")
        half = (samples[0].t + samples[-1].t) / 2
        print(f"acquisition RSS {samples[0].rss:.1f} -> {samples[-1].rss:.1f} MB "
              f"(t={samples[0].t:.0f}..{samples[-1].t:.0f} s), slope "
              f"{slopes([(s.t, s.rss) for s in samples], half)}; CPU "
              f"{100 * statistics.mean(s.cpu for s in first):.1f} % (first third) -> "
              f"{100 * statistics.mean(s.cpu for s in last):.1f} % (last third)")
        print(f"writer RSS {samples[0].writer_rss:.1f} -> {samples[-1].writer_rss:.1f} MB, slope "
              f"{slopes([(s.t, s.writer_rss) for s in samples], half)}; CPU "
              f"{100 * statistics.mean(s.writer_cpu for s in first):.1f} % -> "
              f"{100 * statistics.mean(s.writer_cpu for s in last):.1f} %")
        for line in diagnosis(samples, half):
            print(f"  {line}")
        print(f"last meter stopped -> run closed: {returned - last_stop:.2f} s (the files' "
              f"closes and the alignment); stop -> run closed: {sink.last_close_s:.2f} s")
        for line in watch.growth():
            print(f"  grew: {line}")
        for line in watch.type_growth():
            print(f"  more objects: {line}")
        print(f"zero loss: {all(loss.zero for loss in losses)}")
    finally:
        catalog.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
