"""The catalog writer's share of the end of a run, replayed from a kept journal (no meters).

``end_of_run.py`` times "stop document -> run closed" inside a real fly, where the writer
process competes with the acquisition for the host's cores.  This script isolates the writer:
it replays one run's journal (``catalog.document_sink(keep_journals=True)`` keeps them in
``<catalog>/journal/<session>/closed/``; ``run_overhead.py --keep-journal DIR`` copies its
runs' ones there) into a fresh embedded catalog with the writer process's own code
(``_service._Writer.open_catalog`` and :class:`~smartmeter_ophyd.storage._direct.DirectCatalogWriter`),
and times the end of the run in three ways:

* ``caught up``: the writer applied and wrote the final section (the last collects, the
  end-of-run streams: everything after the earliest of the streams' last StreamDatums) before
  the stop document came (its journals went quiet in between) - the stop alone is timed;
* ``last stream``: as above up to the last descriptor; that stream's documents and the stop
  come in one pass (this project's plans declare ``alignment`` right before ``close_run``);
* ``all at stop``: the final section and the stop in one pass (the writer saw nothing of the
  final section before the stop) - the upper bound.

The run is written in full before (``flush_live(force=True)`` after the pre-final documents:
the state right after a live flush; no other live flush comes).  Each figure is the median of ``--repeat`` runs (the
run is deleted between them), wall and CPU (this process, every thread: SQLite and ADBC work
off the event loop included).

Usage: ``python benchmarks/writer_stop.py JOURNAL.docs [--repeat 5] [--profile 40]``
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import cProfile
import logging
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import host_load

from smartmeter_ophyd.storage import setup_embedded_catalog
from smartmeter_ophyd.storage._journal import read_journal
from smartmeter_ophyd.storage._service import WriterConfig, _Writer


def final_section(docs: Sequence[tuple[str, dict[str, Any]]]) -> int:
    """Index of the first document of the final section: the earliest of the streams' last
    StreamDatums (the final collects), or of the last event/descriptor before the stop."""
    last: dict[str, int] = {}
    for i, (name, doc) in enumerate(docs):
        if name == "stream_datum":
            last[doc["descriptor"]] = i
    if last:
        return min(last.values())
    return max(i for i, (name, _) in enumerate(docs) if name != "stop")


def last_stream(docs: Sequence[tuple[str, dict[str, Any]]]) -> int:
    """Index of the last descriptor."""
    return max(i for i, (name, _) in enumerate(docs) if name == "descriptor")


async def replay(config: WriterConfig, docs: list[tuple[str, dict[str, Any]]], repeat: int,
                 profile: cProfile.Profile | None = None) -> dict[str, list[tuple[float, float]]]:
    writer = _Writer(config)
    await writer.open_catalog()
    direct = writer.writer
    assert direct is not None
    split = final_section(docs)
    cases = {"caught up": len(docs) - 1, "last stream": max(split, last_stream(docs)),
             "all at stop": split}
    uid = docs[0][1]["uid"]
    out: dict[str, list[tuple[float, float]]] = {case: [] for case in cases}
    try:
        for _ in range(repeat):
            for case, at in cases.items():
                run = copy.deepcopy(docs)  # the writer keeps references to documents
                for name, doc in run[:split]:
                    await direct.process(name, doc)
                await direct.flush_live(force=True)
                if at > split:  # the writer's passes, then a quiet one
                    for name, doc in run[split:at]:
                        await direct.process(name, doc)
                    await direct.flush_live()
                    await direct.flush_live(force=direct.pending)
                if profile is not None and case == "all at stop":
                    profile.enable()
                t0, c0 = time.perf_counter(), time.process_time()
                for name, doc in run[at:]:
                    await direct.process(name, doc)
                await direct.flush_live()
                if profile is not None:
                    profile.disable()
                out[case].append((time.perf_counter() - t0, time.process_time() - c0))
                await direct.delete_run(uid)
    finally:
        await writer.root.shutdown()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="LINES",
                        help="profile the 'all at stop' case; print this many lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    docs = list(read_journal(args.journal))
    if not docs or docs[0][0] != "start" or docs[-1][0] != "stop":
        raise SystemExit(f"{args.journal}: not one whole run (start ... stop)")
    split = final_section(docs)
    work = Path(tempfile.mkdtemp(prefix="smartmeter-writer-stop-"))
    try:
        catalog = setup_embedded_catalog(work / "catalog", "smartmeter-writer-stop",
                                         profiles_dir=work / "profiles")
        config = WriterConfig(uri=catalog.catalog_uri,
                              writable_storage=tuple(catalog.writable_storage),
                              readable_storage=tuple(catalog.storage_uris),
                              session=str(work), journal_root=str(work),
                              live_period=3600.0)  # live flushes: only the forced one
        print(f"host: {host_load()}; {args.journal.name}: {len(docs)} documents, final "
              f"section {len(docs) - split}", flush=True)
        profile = cProfile.Profile() if args.profile else None
        results = asyncio.run(replay(config, docs, args.repeat, profile))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for case, times in results.items():
        wall = statistics.median(t for t, _ in times)
        cpu = statistics.median(c for _, c in times)
        print(f"  {case:12s} wall {wall:.3f} s, CPU {cpu:.3f} s (median of {len(times)})")
    print(f"host: {host_load()}")
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
