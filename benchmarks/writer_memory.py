"""The catalog writer's memory over one long run, without meters, at many times real time.

Why: the soak (3 meters at 8 kHz, 29 min) saw the writer process's RSS grow ~5.6 MB/h.  This
script drives the writer process's own code (``_service._Writer.open_catalog`` and
:class:`~smartmeter_ophyd.storage._direct.DirectCatalogWriter`, in this process) with the
documents of one synthetic run shaped as ``plans.synchronized_fly`` emits them: per meter a
samples stream of 7 external keys and a gaps stream of 4 (a StreamResource each, HDF5,
``chunk_shape`` 262144), a ``primary`` event every "1 s" (13 scalar keys per meter) and a
StreamDatum per samples key every "2 s" (16384 samples at 8 kHz); the writer writes after
every "1 s" of documents (``flush_live(force=True)``: what the writer process does whenever
its journals go quiet, i.e. about once per document batch in a real run).

Printed: CPU per "second" of data (``ms/s``: process time, every thread), RSS by kind
(``_memory.mappings``), glibc's malloc account, the sizes of ``catalog.db``/``storage.sqlite``,
and - with ``--tracemalloc`` - the top allocation sites grown between two snapshots of the same
run, each against a baseline taken in the same process after a warm-up; then the same after the
stop document and after a second run, and the catalog's ``structures`` rows (all, and those
data sources reference: equal since the writer prunes replaced structures).  Last line:
``writer memory per stream datum: X bytes``
(RSS growth over the measured section / its StreamDatums; the events and flushes of that
section are included in the figure - they come in fixed proportion).

Usage: ``python benchmarks/writer_memory.py [--meters 3] [--hours 2] [--tracemalloc 15]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import shutil
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from _harness import host_load
from _memory import mallinfo, mappings, type_counts

from smartmeter_ophyd.storage import setup_embedded_catalog
from smartmeter_ophyd.storage._service import WriterConfig, _Writer

RATE = 8000
CHUNK = 16384  # samples per StreamDatum: a meter's ~2 s HDF5 flush
SAMPLE_KEYS = ("v_l1", "i_l1", "v_l2", "i_l2", "v_l3", "i_l3", "time")
GAP_KEYS = ("gap_sample_index", "gap_expected_packet", "gap_received_packet",
            "gap_missing_samples")
LIVE_KEYS = ("time", "samples", "v_l1_rms", "v_l2_rms", "v_l3_rms", "i_l1_rms", "i_l2_rms",
             "i_l3_rms", "p_l1", "p_l2", "p_l3", "p_total", "frequency")

Doc = tuple[str, dict[str, Any]]


class SyntheticRun:
    """The documents of one fly of ``meters`` meters, produced one "second" at a time."""

    def __init__(self, meters: int, directory: Path) -> None:
        self.uid = str(uuid.uuid4())
        self.meters = [f"m{i}" for i in range(meters)]
        self.directory = directory
        self.t = time.time()
        self.second = 0
        self.seq = 0
        self.samples_desc: dict[str, str] = {}
        self.resources: dict[str, list[str]] = {}  # meter -> StreamResource uids (samples)
        self.datums = 0
        self.events = 0

    def opening(self) -> list[Doc]:
        docs: list[Doc] = [("start", {"uid": self.uid, "time": self.t, "scan_id": 1,
                                      "plan_name": "synchronized_fly",
                                      "detectors": list(self.meters)})]
        sres: list[Doc] = []
        for m in self.meters:
            for stream, keys, dtype in ((m, SAMPLE_KEYS, "number"),
                                        (f"{m}_gaps", GAP_KEYS, "integer")):
                desc = str(uuid.uuid4())
                docs.append(("descriptor", {
                    "uid": desc, "run_start": self.uid, "time": self.t, "name": stream,
                    "data_keys": {f"{m}_{k}": {"source": "synthetic", "dtype": dtype,
                                               "shape": [], "external": "STREAM:"}
                                  for k in keys},
                    "object_keys": {m: [f"{m}_{k}" for k in keys]},
                    "configuration": {},
                }))
                if stream == m:
                    self.samples_desc[m] = desc
                uris = []
                for k in keys:
                    uid = str(uuid.uuid4())
                    uris.append(uid)
                    sres.append(("stream_resource", {
                        "uid": uid, "data_key": f"{m}_{k}", "mimetype": "application/x-hdf5",
                        "uri": f"file://localhost{self.directory}/{m}.h5",
                        "parameters": {"dataset": f"/{k}", "swmr": True,
                                       "chunk_shape": [262144]},
                        "run_start": self.uid,
                    }))
                if stream == m:
                    self.resources[m] = uris
        self.primary = str(uuid.uuid4())
        docs.append(("descriptor", {
            "uid": self.primary, "run_start": self.uid, "time": self.t, "name": "primary",
            "data_keys": {f"{m}_live_{k}": {"source": "synthetic", "dtype": "number",
                                            "shape": []}
                          for m in self.meters for k in LIVE_KEYS},
            "object_keys": {m: [f"{m}_live_{k}" for k in LIVE_KEYS] for m in self.meters},
            "configuration": {},
        }))
        return docs + sres

    def next_second(self) -> list[Doc]:
        """One "second" of a fly: a ``primary`` event, and every other second the StreamDatums
        of one chunk per samples key."""
        self.second += 1
        now = self.t + self.second
        self.seq += 1
        self.events += 1
        docs: list[Doc] = [("event", {
            "uid": str(uuid.uuid4()), "time": now, "descriptor": self.primary,
            "seq_num": self.seq, "filled": {},
            "data": {f"{m}_live_{k}": 230.0 + self.second % 7 for m in self.meters
                     for k in LIVE_KEYS},
            "timestamps": {f"{m}_live_{k}": now for m in self.meters for k in LIVE_KEYS},
        })]
        if self.second % 2 == 0:
            n = self.second // 2 - 1
            for m in self.meters:
                for sres in self.resources[m]:
                    docs.append(("stream_datum", {
                        "uid": f"{sres}/{n}", "stream_resource": sres,
                        "descriptor": self.samples_desc[m],
                        "seq_nums": {"start": 1 + n * CHUNK, "stop": 1 + (n + 1) * CHUNK},
                        "indices": {"start": n * CHUNK, "stop": (n + 1) * CHUNK},
                    }))
                    self.datums += 1
        return docs

    def stop(self) -> Doc:
        return ("stop", {"uid": str(uuid.uuid4()), "run_start": self.uid,
                         "time": self.t + self.second, "exit_status": "success",
                         "reason": "", "num_events": {"primary": self.events}})


_SQLITE = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
_SQLITE.sqlite3_memory_used.restype = ctypes.c_int64


def sqlite_mb() -> float:
    """MB that the system SQLite (Python's ``sqlite3``, under aiosqlite: the catalog database)
    has allocated; the ADBC driver (event tables) links its own SQLite, not seen here."""
    return float(_SQLITE.sqlite3_memory_used()) / 1e6


def cap_page_caches(root: Any, kib: int) -> None:
    """Diagnostic: every SQLite connection of the catalog (SQLAlchemy/aiosqlite) and of its
    SQL storage (ADBC) gets ``PRAGMA cache_size=-kib`` at each checkout."""
    from sqlalchemy import event
    from tiled.storage import SQLStorage

    def catalog(dbapi_connection: Any, *_: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA cache_size=-{kib}")
        cursor.close()

    event.listen(root.context.engine.sync_engine.pool, "checkout", catalog)
    for storage in root.context.writable_storage.values():
        if isinstance(storage, SQLStorage):
            event.listen(storage._connection_pool, "checkout", catalog)


def rss() -> float:
    """MB: anonymous + heap (what grew in the soak; libraries and files excluded)."""
    m = mappings()
    return m["anon"] + m["heap"]


DATABASES: list[Path] = []


def report(label: str, base: float, datums: int) -> float:
    gc.collect()
    sizes = "/".join(f"{p.stat().st_size / 1e6:.1f}" for p in DATABASES if p.exists())
    now = rss()
    info = mallinfo()
    per = f", {(now - base) * 1e6 / datums:.0f} B/datum" if datums else ""
    print(f"  {label:40s} anon+heap {now:7.1f} MB ({now - base:+6.2f}{per}); malloc in use "
          f"{info.in_use:6.1f} MB, free kept {info.free:5.1f} MB; system SQLite {sqlite_mb():5.2f} MB; "
          f"databases {sizes} MB",
          flush=True)
    return now


async def drive(writer: Any, run: SyntheticRun, seconds: int) -> None:
    for _ in range(seconds):
        for name, doc in run.next_second():
            await writer.process(name, doc)
        await writer.flush_live(force=True)


def structures(path: Path) -> str:
    """The catalog's ``structures`` rows (content-addressed; the writer deletes those it
    replaced that no data source references): how many, how many referenced, their JSON."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        count, largest, total = db.execute(
            "SELECT count(*), max(length(structure)), sum(length(structure)) FROM structures"
        ).fetchone()
        (referenced,) = db.execute(
            "SELECT count(DISTINCT structure_id) FROM data_sources"
        ).fetchone()
    return (f"catalog.db: {count} structures rows ({referenced} referenced by data sources), "
            f"{total / 1e6:.2f} MB of JSON, the largest {largest} B")


def pools(root: Any) -> str:
    """Connections open in the catalog's pool and in its SQL storage's (ADBC) pool."""
    from tiled.storage import SQLStorage

    out = [f"catalog {root.context.engine.sync_engine.pool.checkedin()}"]
    for storage in root.context.writable_storage.values():
        if isinstance(storage, SQLStorage) and "_connection_pool" in storage.__dict__:
            out.append(f"tables {storage._connection_pool.checkedin()}")
    return ", ".join(out) + " idle connections"


class Traces:
    """tracemalloc snapshots by phase (when asked for): where Python-level memory grew."""

    def __init__(self, lines: int, frames: int) -> None:
        self.lines = lines
        if lines:
            tracemalloc.start(frames)
        self.snapshots: dict[str, tracemalloc.Snapshot] = {}

    def take(self, phase: str) -> None:
        if self.lines:
            self.snapshots[phase] = tracemalloc.take_snapshot()

    def growth(self, before: str, after: str) -> None:
        if not self.lines:
            return
        stats = self.snapshots[after].compare_to(self.snapshots[before], "traceback")
        total = sum(s.size_diff for s in stats) / 1024
        print(f"  tracemalloc {before} -> {after}: {total:+.1f} KiB in all; top sites:")
        for stat in stats[: self.lines]:
            frames = [f for f in stat.traceback if "/asyncio/" not in f.filename][-4:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
            print(f"    {stat.size_diff / 1024:+8.1f} KiB {stat.count_diff:+7d} blocks  {where}")

    def stop(self) -> None:
        if self.lines:
            tracemalloc.stop()


async def one_run(writer: Any, run: SyntheticRun, seconds: int, base: float,
                  label: str, traces: Traces | None = None) -> list[tuple[int, float]]:
    """``seconds`` of data in four parts; (datums, RSS) after each part, then the stop."""
    points = [(run.datums, rss())]
    for part in range(1, 5):
        t0 = time.process_time()
        await drive(writer, run, seconds // 4)
        cpu = (time.process_time() - t0) / (seconds // 4) * 1e3
        gc.collect()
        points.append((run.datums, report(
            f"{label} at {run.second / 3600:.2f} h ({cpu:.1f} ms/s)", base,
            run.datums - points[0][0])))
        if traces is not None and part == 4:
            traces.take(f"{label} end")
    await writer.process(*run.stop())
    await writer.flush_live(force=True)
    report(f"{label} stopped", base, 0)
    return points


async def measure(config: WriterConfig, args: argparse.Namespace, work: Path) -> None:
    service = _Writer(config)
    await service.open_catalog()
    writer = service.writer
    assert writer is not None
    if args.cache_kib:
        cap_page_caches(service.root, args.cache_kib)
    seconds = int(args.hours * 3600)
    traces = Traces(args.tracemalloc, args.frames)
    try:
        run = SyntheticRun(args.meters, work)
        for name, doc in run.opening():
            await writer.process(name, doc)
        await drive(writer, run, args.warmup)
        gc.collect()
        base = report(f"after {args.warmup} s warm-up", rss(), 0)
        traces.take("baseline")
        types0 = type_counts()
        t0 = time.perf_counter()
        points = await one_run(writer, run, seconds, base, "run 1", traces)
        wall = time.perf_counter() - t0
        traces.take("run 1 stopped")
        types = type_counts()
        types.subtract(types0)
        print("  gc-tracked objects grown over run 1: " + ", ".join(
            f"{name} {n:+d}" for name, n in types.most_common(8) if n > 0))
        run2 = SyntheticRun(args.meters, work)
        for name, doc in run2.opening():
            await writer.process(name, doc)
        await one_run(writer, run2, args.warmup + seconds, base, "run 2")
        traces.take("run 2 stopped")
        print(f"  {pools(service.root)}; {structures(DATABASES[0])}")
        traces.growth("baseline", "run 1 end")
        traces.growth("run 1 stopped", "run 2 stopped")
    finally:
        traces.stop()
        await service.root.shutdown()
    (d0, r0), (d2, r2), (d4, r4) = points[0], points[2], points[4]
    print(f"measured: {seconds} s of data in {wall:.1f} s ({seconds / wall:.0f}x real time), "
          f"{d4 - d0} StreamDatums, {seconds} events, {seconds} flushes")
    print(f"writer memory per stream datum: {(r2 - r0) * 1e6 / (d2 - d0):.0f} bytes over the "
          f"first half, {(r4 - r2) * 1e6 / (d4 - d2):.0f} bytes over the second half "
          f"({(r2 - r0) / (seconds / 7200):+.2f} and {(r4 - r2) / (seconds / 7200):+.2f} MB/h)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--hours", type=float, default=1.0, help="of data, measured section")
    parser.add_argument("--warmup", type=int, default=300, help="s of data before the baseline")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="LINES")
    parser.add_argument("--cache-kib", type=int, default=0,
                        help="diagnostic: cap every SQLite page cache at this many KiB")
    parser.add_argument("--frames", type=int, default=6, help="tracemalloc frames kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-writer-memory-"))
    try:
        catalog = setup_embedded_catalog(work / "catalog", "smartmeter-writer-memory",
                                         profiles_dir=work / "profiles")
        DATABASES.extend([work / "catalog" / "catalog.db", work / "catalog" / "storage.sqlite"])
        config = WriterConfig(uri=catalog.catalog_uri,
                              writable_storage=tuple(catalog.writable_storage),
                              readable_storage=tuple(catalog.storage_uris),
                              session=str(work), journal_root=str(work))
        print(f"host: {host_load()}; {args.meters} meters, {args.hours} h of data", flush=True)
        asyncio.run(measure(config, args, work))
        print(f"host: {host_load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
