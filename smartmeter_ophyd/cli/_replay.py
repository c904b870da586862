"""``smartmeter replay JOURNAL…``: write kept journals of runs into a catalog.

A run's documents are journaled on disk before any catalog sees them (the storage's
``JournalSink``).  When the catalog was unreachable, or
refused a run, the journal stays: ``<run uid>.docs`` (kept or still waiting),
``<run uid>.failed`` (refused by the writer) or ``<run uid>.orphaned``.  This command feeds
each one, in order, to the catalog's writer (``TiledWriter``), so the run appears in the
catalog as if it had been written live.

JOURNAL is a journal file or a directory: every journal under it is replayed, oldest
first.  A run the catalog already holds is skipped (replaying is idempotent).  A journal
without a stop document is replayed as far as it goes and reported as such: the run stays
open in the catalog.

The run's HDF5 files are not copied: the catalog must be able to read them where the run
wrote them (the embedded catalog under --data-dir reads its own data directory; a Tiled
server needs them in its readable storage).

Exit status: 0 every journal replayed or already there, 1 the catalog refused one (the
others are still replayed), 2 a usage mistake (a path that is not a journal, no catalog).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_catalog_options,
    add_json_option,
    open_catalog,
    print_json,
    say,
)

logger = logging.getLogger(__name__)

JOURNAL_SUFFIXES: Final = (".docs", ".failed", ".orphaned")
"""How the journal sink names a run's journal: waiting or kept, refused, left by a dead process."""


@dataclass
class Replayed:
    """What happened to one journal."""

    journal: str
    uid: str
    outcome: str
    """``"replayed"``, ``"already in the catalog"`` or ``"failed"``."""
    documents: int
    exit_status: str | None
    """The run's stop document's ``exit_status``; None if the journal has no stop."""
    error: str | None = None


def add_replay_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("journals", metavar="JOURNAL", nargs="+", type=Path,
                   help="a journal file (<run uid>.docs, .failed, .orphaned) or a directory "
                        "of them")
    add_catalog_options(p)
    add_json_option(p)


def journal_files(paths: list[Path]) -> list[Path]:
    """The journal files the arguments name (directories searched), each once, in order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted((p for p in path.rglob("*")
                             if p.is_file() and p.suffix in JOURNAL_SUFFIXES),
                            key=lambda p: (p.stat().st_mtime, p.name))
            if not inside:
                raise UsageError(f"no journal (*{', *'.join(JOURNAL_SUFFIXES)}) under {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise UsageError(f"journal {path} is neither a file nor a directory")
        else:
            raise UsageError(f"journal {path} does not exist")
    unique: dict[Path, None] = dict.fromkeys(p.resolve() for p in found)
    return list(unique)


def read_run(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every document of one journal; refuses, as a usage mistake, a file that is not one."""
    from ..storage import read_journal

    try:
        docs = list(read_journal(path))
    except OSError as exc:
        raise UsageError(f"cannot read journal {path}: {exc.strerror or exc}") from None
    except (TypeError, ValueError):  # msgpack, but not [name, document] records
        raise UsageError(f"{path} is not a journal: its records are not [name, document] "
                         "pairs") from None
    except Exception as exc:  # msgpack's format errors share no base class worth naming
        raise UsageError(f"{path} is not a journal: {type(exc).__name__}: {exc}") from None
    if not docs:
        raise UsageError(f"{path} is not a journal: it holds no complete document")
    first, doc = docs[0]
    if first != "start" or not isinstance(doc, dict) or not isinstance(doc.get("uid"), str):
        raise UsageError(f"{path} is not a journal: it begins with a {first!r} "
                         "document, not a run's start document")
    return docs


def replay_one(path: Path, docs: list[tuple[str, dict[str, Any]]], client: Any) -> Replayed:
    from ..storage import make_tiled_writer

    uid = docs[0][1]["uid"]
    stops = [doc for name, doc in docs if name == "stop"]
    exit_status = stops[-1].get("exit_status") if stops else None
    if uid in client:
        if stops and client[uid].metadata.get("stop") is None:
            return Replayed(str(path), uid, "failed", 0, exit_status,
                            "the catalog holds this run without its stop document (written "
                            "partly); remove the run from the catalog, then replay")
        return Replayed(str(path), uid, "already in the catalog", 0, exit_status)
    # TiledWriter batches events and stream data until the stop document; without one,
    # nothing may wait in a batch or it would never reach the catalog.
    writer = make_tiled_writer(client) if stops else make_tiled_writer(client, batch_size=1)
    count = 0
    try:
        for name, doc in docs:
            writer(name, doc)
            count += 1
    except Exception as exc:
        name = docs[count][0]
        logger.debug("replaying %s failed at document %d", path, count, exc_info=True)
        return Replayed(str(path), uid, "failed", count, exit_status,
                        f"the catalog refused its {name} document (#{count + 1}): "
                        f"{type(exc).__name__}: {exc}")
    return Replayed(str(path), uid, "replayed", count, exit_status)


def describe(result: Replayed) -> str:
    if result.outcome == "failed":
        return f"{result.journal}: run {result.uid} not replayed: {result.error}"
    if result.outcome != "replayed":
        return f"{result.journal}: run {result.uid} is already in the catalog; skipped"
    end = (f"exit status {result.exit_status}" if result.exit_status is not None
           else "no stop document: the run stays open in the catalog")
    return f"{result.journal}: replayed run {result.uid} ({result.documents} documents, {end})"


def cmd_replay(args: argparse.Namespace) -> int:
    """Write kept journals into a catalog (see ``smartmeter replay --help``)."""
    runs = [(path, read_run(path)) for path in journal_files(args.journals)]
    catalog = open_catalog(args, create=False)
    try:
        results = []
        for path, docs in runs:
            result = replay_one(path, docs, catalog.client)
            results.append(result)
            if args.json:
                continue
            if result.outcome == "failed":
                say(f"error: {describe(result)}")
            else:
                print(describe(result), flush=True)
    finally:
        catalog.close()
    if args.json:
        print_json(results)
    return EXIT_FAILED if any(r.outcome == "failed" for r in results) else EXIT_OK
