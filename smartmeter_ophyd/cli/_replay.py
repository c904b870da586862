"""``smartmeter replay JOURNAL…``: write kept journals of runs into a catalog.

A run's documents are journaled on disk before any catalog sees them (the storage's
``JournalSink``).  When the catalog was unreachable, or
refused a run, the journal stays: ``<run uid>.docs`` (kept or still waiting),
``<run uid>.failed`` (refused by the writer) or ``<run uid>.orphaned``.  This command writes
each one, in order, through the catalog's writer (``TiledWriter``, by the storage's
``replay_into_tiled``), so the run appears in the catalog as if it had been written live.

JOURNAL is a journal file or a directory: every journal under it is replayed, oldest
first.  A run the catalog already holds is skipped (replaying is idempotent).  A journal
without a stop document is replayed as far as it goes (unbatched, so no event waits for the
missing stop) and reported as such: the run stays open in the catalog.  A run the catalog
refuses is reported with the document it refused.

The run's HDF5 files are not copied: the catalog must be able to read them where the run
wrote them (the embedded catalog under --data-dir reads its own data directory; a Tiled
server needs them in its readable storage).

Exit status: 0 every journal replayed or already there, 1 the catalog refused one (the
others are still replayed), 2 a usage mistake (a path that is not a journal, no catalog).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

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

if TYPE_CHECKING:
    from ..storage import ReplayReport

logger = logging.getLogger(__name__)

JOURNAL_SUFFIXES: Final = (".docs", ".failed", ".orphaned")
"""How the journal sink names a run's journal: waiting or kept, refused, left by a dead process."""


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


def check_journal(path: Path) -> None:
    """Refuse, as a usage mistake, a file that is not one run's journal (read before any
    catalog is opened, so a mistake touches nothing)."""
    from ..storage import read_run_journal

    try:
        read_run_journal(path)
    except OSError as exc:
        raise UsageError(f"cannot read journal {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_replay(args: argparse.Namespace) -> int:
    """Write kept journals into a catalog (see ``smartmeter replay --help``)."""
    from ..storage import replay_into_tiled

    paths = journal_files(args.journals)
    for path in paths:
        check_journal(path)
    catalog = open_catalog(args, create=False)
    try:
        results: list[ReplayReport] = []
        for path in paths:
            result = replay_into_tiled(path, catalog.client)
            results.append(result)
            if args.json:
                continue
            if result.ok:
                print(result.describe(), flush=True)
            else:
                say(f"error: {result.describe()}")
    finally:
        catalog.close()
    if args.json:
        print_json(results)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED
