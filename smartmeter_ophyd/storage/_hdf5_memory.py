"""HDF5's own memory in a process that writes waveform files: bounded, so that a long run's
resident memory levels off instead of growing with the number of chunks written.

Two of the HDF5 library's caches grow with a file's chunk count while it is open.  Measured
with 3 meters at 8 kHz (2-s chunks), in a 2-hour replay of the I/O thread's appends: malloc in
use grew +1.7 MB per hour, none of it Python objects, all of it freed when the files closed.

* **Each open file's metadata cache** keeps every block of the chunk index (an extensible
  array) it has written, about 0.25 MB per file-hour, until the cache's maximum size (2 MiB by
  default, which HDF5 may raise adaptively).  A writer only appends, so it never needs the old
  blocks again: :func:`bound_metadata_cache` caps the cache at :data:`METADATA_CACHE_BYTES`,
  which an 8 kHz file fills in its first ~15 minutes.  HDF5's factory free list, which holds
  the index's element blocks, grows with the cache and stops with it.
* **HDF5's free lists** keep what the library frees for reuse, up to 16 MiB per kind of list
  and process by default; what they held grew +0.8 MB/h here, with the metadata cache capped
  or not.  Lowering the *block* free lists' limits bounds it (lowering the
  regular, array or factory lists' alone did not): :func:`limit_block_free_lists` sets them
  to :data:`BLOCK_FREE_LIST_BYTES` once per process; glibc's malloc then reuses that memory as
  it does any other.

With both, ``benchmarks/hdf5_memory.py --minutes 300`` (both settings side by side, 5 hours of
data) measured malloc in use +0.04 MB/h over the second half, against +1.50 MB/h with HDF5's
defaults, for the same CPU time (181.6 s and 181.5 s).  With a 256 KiB cap the caches took an
hour of data to fill (malloc in use +1.6 MB over it, then flat), so a soak shorter than that
read the fill as growth; at 64 KiB they fill in 15-20 minutes (``--minutes 60``: +0.09 MB/h
over the second half, against +1.83 with HDF5's defaults), and a 90-minute replay used no more
CPU than at 256 KiB (37.5 s against 45.5 s, the two run side by side).

Limits: HDF5's free-list limits have no h5py binding.  They are set through ``ctypes`` on the
very library h5py loaded, found by path in ``/proc/self/maps`` (Linux); where it cannot be
found, the limits stay at HDF5's defaults and a debug message says so.  The limits are
process-wide and apply to every HDF5 user in the process, reader or writer.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
from typing import Final

import h5py
import h5py.h5

logger = logging.getLogger(__name__)

METADATA_CACHE_BYTES: Final = 64 * 1024
"""Maximum size of an open waveform file's metadata cache (HDF5's default: 2 MiB, adaptive)."""
BLOCK_FREE_LIST_BYTES: Final = 64 * 1024
"""Freed HDF5 blocks kept for reuse, in all block free lists together (HDF5's default: 16 MiB);
each list keeps a quarter of it."""

# HDF5's defaults for the other free lists (H5FL.c), passed unchanged: the call sets all eight.
_REGULAR_LIMITS: Final = (1024 * 1024, 64 * 1024)
_ARRAY_LIMITS: Final = (4 * 1024 * 1024, 256 * 1024)
_FACTORY_LIMITS: Final = (16 * 1024 * 1024, 1024 * 1024)
_LIBRARY_NAME: Final = re.compile(r"^libhdf5(?:-[0-9a-f]+)?\.so")


def bound_metadata_cache(file: h5py.File, max_bytes: int = METADATA_CACHE_BYTES) -> None:
    """Cap ``file``'s metadata cache at ``max_bytes`` (its starting and smallest size too,
    where HDF5's are larger)."""
    file_id = file.id
    config = file_id.get_mdc_config()
    config.max_size = max_bytes
    config.min_size = min(config.min_size, max_bytes)
    config.initial_size = min(config.initial_size, max_bytes)
    config.set_initial_size = True
    file_id.set_mdc_config(config)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The HDF5 library h5py loaded, or None where it cannot be found."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libhdf5" in line}
    except OSError:
        return None
    found = sorted(p for p in paths if _LIBRARY_NAME.match(os.path.basename(p)))
    if not found:
        return None
    try:
        return ctypes.CDLL(found[0])  # the loaded library: dlopen returns its handle
    except OSError:
        return None


@functools.cache
def limit_block_free_lists() -> bool:
    """Lower HDF5's block free-list limits to :data:`BLOCK_FREE_LIST_BYTES` in this process
    (once; later calls return the first answer).  True if they were set."""
    library = _library()
    if library is None:
        logger.debug("HDF5 library not found in this process's mappings: free-list limits "
                     "stay at HDF5's defaults")
        return False
    limits = (*_REGULAR_LIMITS, *_ARRAY_LIMITS,
              BLOCK_FREE_LIST_BYTES, BLOCK_FREE_LIST_BYTES // 4, *_FACTORY_LIMITS)
    with h5py.h5.phil:  # h5py's lock around every call into HDF5
        status = library.H5set_free_list_limits(*(ctypes.c_int(v) for v in limits))
    if status < 0:
        logger.debug("H5set_free_list_limits failed (%d): limits stay at HDF5's defaults",
                     status)
        return False
    return True


def free_list_sizes() -> tuple[int, int, int, int] | None:
    """Bytes HDF5's free lists hold (regular, array, block, factory), or None where the
    library cannot be found."""
    library = _library()
    if library is None:
        return None
    sizes = [ctypes.c_size_t() for _ in range(4)]
    with h5py.h5.phil:
        library.H5get_free_list_sizes(*(ctypes.byref(s) for s in sizes))
    regular, array, block, factory = (s.value for s in sizes)
    return regular, array, block, factory
