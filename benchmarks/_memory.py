"""Where a process's resident memory is, for the soak (not a benchmark itself; Linux/glibc).

* :func:`mappings` - RSS of a process (any pid) by kind of mapping, from ``/proc/<pid>/smaps``:
  ``heap`` (the main arena's brk heap), ``anon`` (anonymous mappings: glibc's thread arenas,
  its large mmapped chunks, pymalloc's 1 MiB arenas, thread stacks), ``lib`` (shared
  libraries and other file mappings) and ``files`` (HDF5 or other data files mapped);
* :func:`mallinfo` - glibc's own account of this process's malloc (all arenas): bytes in use,
  bytes free but kept, bytes in large mmapped chunks;
* :func:`malloc_trim` - ``malloc_trim(0)``, a diagnostic only: RSS that it returns was free
  memory glibc kept (fragmentation), not a leak;
* :func:`pymalloc` - pymalloc's arenas and the blocks allocated in them;
* :func:`type_counts` - live objects the garbage collector tracks, by type.

Limits: glibc only (``mallinfo2`` needs glibc >= 2.33); ``mallinfo`` and ``malloc_trim`` see
this process only.  pymalloc's arenas are anonymous mappings outside glibc's account, so
``anon + heap - (arena + mmapped)`` of :func:`mallinfo` is roughly pymalloc plus stacks.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
from dataclasses import dataclass
from pathlib import Path

KINDS = ("heap", "anon", "lib", "files")


def mappings(pid: int | None = None) -> dict[str, float]:
    """RSS in MB by kind of mapping (see the module docstring), plus ``"total"``."""
    totals = dict.fromkeys(KINDS, 0.0)
    kind = "anon"
    for line in Path(f"/proc/{pid or os.getpid()}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            path = head[5] if len(head) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif not path or path.startswith("["):
                kind = "anon"
            elif ".so" in path or path.startswith(("/usr/", "/lib")) or "/.venv/" in path:
                kind = "lib"
            else:
                kind = "files"
        elif head[0] == "Rss:":
            totals[kind] += int(head[1]) / 1024
    totals["total"] = sum(totals[k] for k in KINDS)
    return totals


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@dataclass(frozen=True)
class Mallinfo:
    """glibc's malloc, in MB: obtained from the system in arenas, in use, free in the
    arenas (kept, not returned), in large chunks mmapped on their own."""

    arena: float
    in_use: float
    free: float
    mmapped: float


def mallinfo() -> Mallinfo:
    fn = _libc.mallinfo2
    fn.restype = _Mallinfo2
    info = fn()
    mb = 1024 * 1024
    return Mallinfo(info.arena / mb, info.uordblks / mb, info.fordblks / mb, info.hblkhd / mb)


def malloc_trim() -> None:
    """Return glibc's free pages to the system (diagnostic: what RSS drops was not in use)."""
    _libc.malloc_trim(0)


def type_counts() -> collections.Counter[str]:
    """Live gc-tracked objects by type name."""
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def pymalloc() -> tuple[float, float]:
    """(MB in pymalloc's arenas, MB of blocks allocated in them) from
    ``_PyObject_DebugMallocStats``: arenas that grow while the blocks do not are
    fragmentation (tracemalloc counts the blocks only)."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        fopen, fclose = _libc.fopen, _libc.fclose
        fopen.restype = ctypes.c_void_p
        fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        fclose.argtypes = [ctypes.c_void_p]
        stream = fopen(out.name.encode(), b"w")
        ctypes.pythonapi._PyObject_DebugMallocStats.argtypes = [ctypes.c_void_p]
        ctypes.pythonapi._PyObject_DebugMallocStats(stream)
        fclose(stream)
        text = out.read()
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = int(value.strip().replace(",", "").split()[0])
    mb = 1024 * 1024
    arena_bytes = 1 << 20  # 1 MiB since Python 3.10
    return (values.get("# arenas allocated current", 0) * arena_bytes / mb,
            values.get("# bytes in allocated blocks", 0) / mb)
