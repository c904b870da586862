"""A run's bluesky documents in an append-only file, written before anyone else sees them.

Intent: the acquisition process must never lose a document because the catalog writer is
slow, stuck or dead.  So every document goes first into a **journal**: one file per run,
``<run uid>.docs``, a plain sequence of msgpack records ``[name, doc]``.  Appending costs one
``msgpack`` encode and one ``write`` to the operating system (no ``fsync`` per document: the
file survives the death of any process; the stop document is ``fsync``-ed, which makes the
whole run durable against a host crash too).  A writer process reads journals with
:class:`JournalReader`, which returns only complete records, so it can tail a file that is
still growing.  :func:`replay_journal` feeds a journal to any bluesky callback;
:func:`replay_into_tiled` writes one kept journal (one run) into a Tiled catalog the direct
writer cannot reach, and reports, per journal, which document the catalog refused.

A ``TiledWriter`` keeps events and stream data in batches until the run's stop document; a
journal whose process died before the stop would leave those batches unwritten for ever.
:func:`replay_into_tiled` therefore writes a stop-less journal unbatched (``batch_size=1``),
with each run of consecutive StreamDatums merged first (one catalog update each, as a batch
would have been): every document reaches the catalog.  ``replay_journal(path,
make_tiled_writer(client))`` does not know this and loses the events of such a journal.

Encoding: documents are JSON-like; numpy arrays become lists and numpy scalars Python
scalars (what ``event_model.sanitize_doc`` does), so the journal needs no numpy to be read.

Limits: one writer per file (the acquisition process); a record is at most ``max_record``
bytes (default 64 MiB) - a larger one is refused by the writer with an error naming the
document.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgpack
import numpy as np

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX: Final = ".docs"
MAX_RECORD: Final = 64 * 1024 * 1024


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot journal an object of type {type(obj).__name__}: {obj!r}")


def pack_document(name: str, doc: Any) -> bytes:
    """One journal record."""
    return msgpack.packb([name, doc], default=_default, use_bin_type=True)


class JournalWriter:
    """Append documents of one run to ``path`` (created; an existing file is appended to)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.records = 0
        self.bytes = 0

    def append(self, name: str, doc: Any) -> None:
        """Write one document through to the operating system."""
        data = pack_document(name, doc)
        if len(data) > MAX_RECORD:
            raise ValueError(
                f"{name} document {doc.get('uid', '')!r} is {len(data)} bytes, above the "
                f"journal's {MAX_RECORD}-byte record limit"
            )
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.records += 1
        self.bytes += len(data)

    def sync(self) -> None:
        """``fsync``: the journal survives a host crash from here on."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JournalReader:
    """Read complete records of a journal that may still be growing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self._unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, max_buffer_size=MAX_RECORD * 2
        )
        self.records = 0

    def read(self, chunk: int = 1 << 20) -> list[tuple[str, dict[str, Any]]]:
        """Records completed since the last call (a torn tail waits for its rest)."""
        out: list[tuple[str, dict[str, Any]]] = []
        while True:
            data = self._file.read(chunk)
            if not data:
                break
            self._unpacker.feed(data)
            for record in self._unpacker:
                name, doc = record
                out.append((str(name), doc))
        self.records += len(out)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every complete record of a journal file, in order."""
    with JournalReader(path) as reader:
        yield from reader.read()


def replay_journal(path: str | os.PathLike[str], callback: Callable[[str, Any], Any]) -> int:
    """Feed every document of a journal to ``callback(name, doc)``; the number fed.

    For a Tiled catalog use :func:`replay_into_tiled`: a ``TiledWriter`` fed here holds a
    stop-less journal's events in its batches and never writes them.
    """
    count = 0
    for name, doc in read_journal(path):
        callback(name, doc)
        count += 1
    return count


ReplayOutcome = Literal["replayed", "already in the catalog", "failed"]


@dataclass(frozen=True)
class ReplayReport:
    """What :func:`replay_into_tiled` did with one journal (one run)."""

    journal: str
    uid: str
    outcome: ReplayOutcome
    documents: int
    """Journal documents the catalog's writer took without error (when ``failed``, ``error``
    gives the refused document's number; with batching, the refusal may concern data batched
    before it)."""
    exit_status: str | None
    """The run's stop document's ``exit_status``; None if the journal has no stop."""
    error: str | None = None
    """Why the run was not written (``failed`` only)."""
    refused_document: str | None = None
    """The name of the document the catalog refused (None: refused before any document)."""

    @property
    def ok(self) -> bool:
        """Replayed, or already in the catalog."""
        return self.outcome != "failed"

    def describe(self) -> str:
        """One line for a person: the journal, the run and what happened to it."""
        if self.outcome == "failed":
            return f"{self.journal}: run {self.uid} not replayed: {self.error}"
        if self.outcome == "already in the catalog":
            return f"{self.journal}: run {self.uid} is already in the catalog; skipped"
        end = (f"exit status {self.exit_status}" if self.exit_status is not None
               else "no stop document: the run stays open in the catalog")
        return f"{self.journal}: replayed run {self.uid} ({self.documents} documents, {end})"


def read_run_journal(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every document of one run's journal, checked to begin with the run's start document.

    Raises ``ValueError`` naming ``path`` for a file that is not a journal (not msgpack
    ``[name, document]`` records, empty, or not beginning with a start document with a
    ``uid``); ``OSError`` when it cannot be read.
    """
    try:
        docs = list(read_journal(path))
    except OSError:
        raise
    except (TypeError, ValueError):  # msgpack, but not [name, document] records
        raise ValueError(f"{path} is not a journal: its records are not [name, document] "
                         "pairs") from None
    except Exception as exc:  # msgpack's format errors share no base class worth naming
        raise ValueError(f"{path} is not a journal: {type(exc).__name__}: {exc}") from None
    if not docs:
        raise ValueError(f"{path} is not a journal: it holds no complete document")
    first, doc = docs[0]
    if first != "start" or not isinstance(doc, dict) or not isinstance(doc.get("uid"), str):
        raise ValueError(f"{path} is not a journal: it begins with a {first!r} "
                         "document, not a run's start document")
    return docs


def replay_into_tiled(path: str | os.PathLike[str], client: Any) -> ReplayReport:
    """Write one run's journal into the Tiled catalog ``client`` (a bluesky-runs container).

    A run the catalog already holds is skipped (replaying is idempotent), unless it is
    there without its stop document while the journal has one: then the run was written
    partly, and is reported as ``failed`` (remove it from the catalog and replay).  A journal
    with a stop document is written with the writer's batching; one without is written
    unbatched, so no event or stream datum waits for a stop that will never come (see the
    module docstring; consecutive StreamDatums are merged first, as the batches would have
    been); the run then stays open in the catalog.  The catalog refusing a
    document ends the replay: the report names the document and its number (the run stays
    in the catalog as far as it was written).  Raises as :func:`read_run_journal` for what is
    not a journal.
    """
    from ._consolidator import make_tiled_writer

    docs = read_run_journal(path)
    uid: str = docs[0][1]["uid"]
    stops = [doc for name, doc in docs if name == "stop"]
    exit_status = stops[-1].get("exit_status") if stops else None
    journal = str(path)
    if uid in client:
        if stops and client[uid].metadata.get("stop") is None:
            return ReplayReport(journal, uid, "failed", 0, exit_status,
                                "the catalog holds this run without its stop document (written "
                                "partly); remove the run from the catalog, then replay")
        return ReplayReport(journal, uid, "already in the catalog", 0, exit_status)
    if stops:
        writer, plan = make_tiled_writer(client), [(i, 1, name, doc) for i, (name, doc)
                                                   in enumerate(docs)]
    else:
        writer, plan = make_tiled_writer(client, batch_size=1), _unbatched_plan(docs)
    count = 0
    for index, parts, name, doc in plan:
        try:
            writer(name, doc)
        except Exception as exc:
            logger.debug("replaying %s failed at document %d", journal, index + 1, exc_info=True)
            return ReplayReport(journal, uid, "failed", count, exit_status,
                                f"the catalog refused its {name} document (#{index + 1}): "
                                f"{type(exc).__name__}: {exc}", refused_document=name)
        count += parts
    return ReplayReport(journal, uid, "replayed", count, exit_status)


def _unbatched_plan(
    docs: list[tuple[str, dict[str, Any]]],
) -> list[tuple[int, int, str, dict[str, Any]]]:
    """A stop-less journal for an unbatched writer, as ``(index, parts, name, doc)``.

    Unbatched, a writer updates the catalog once per StreamDatum (one request each: minutes
    for a long run).  So consecutive StreamDatums of one StreamResource are merged into one,
    as a batching writer does until its stop, and each merged one is written where the next
    does not continue it, or at the end; ``index`` is the journal position of its first part
    and ``parts`` how many journal documents it stands for.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import concatenate_stream_datums

    plan: list[tuple[int, int, str, dict[str, Any]]] = []
    pending: dict[str, tuple[int, int, dict[str, Any]]] = {}  # by StreamResource uid
    for index, (name, doc) in enumerate(docs):
        if name != "stream_datum":
            plan.append((index, 1, name, doc))
            continue
        key = doc["stream_resource"]
        held = pending.pop(key, None)
        if held is not None:
            first, parts, merged = held
            if (merged["descriptor"] == doc["descriptor"]
                    and merged["indices"]["stop"] == doc["indices"]["start"]
                    and merged["seq_nums"]["stop"] == doc["seq_nums"]["start"]):
                pending[key] = (first, parts + 1, dict(concatenate_stream_datums(merged, doc)))
                continue
            plan.append((first, parts, name, merged))
        pending[key] = (index, 1, doc)
    plan += [(first, parts, "stream_datum", merged) for first, parts, merged in pending.values()]
    return plan
