"""A run's bluesky documents in an append-only file, written before anyone else sees them.

Intent: the acquisition process must never lose a document because the catalog writer is
slow, stuck or dead.  So every document goes first into a **journal**: one file per run,
``<run uid>.docs``, a plain sequence of msgpack records ``[name, doc]``.  Appending costs one
``msgpack`` encode and one ``write`` to the operating system (no ``fsync`` per document: the
file survives the death of any process; the stop document is ``fsync``-ed, which makes the
whole run durable against a host crash too).  A writer process reads journals with
:class:`JournalReader`, which returns only complete records, so it can tail a file that is
still growing.  :func:`replay_journal` feeds a journal to any bluesky callback - for example a
``TiledWriter`` for a catalog the direct writer cannot reach.

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
from pathlib import Path
from typing import Any, Final

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
    """Feed every document of a journal to ``callback(name, doc)``; the number fed."""
    count = 0
    for name, doc in read_journal(path):
        callback(name, doc)
        count += 1
    return count
