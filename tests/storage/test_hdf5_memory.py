"""WaveformWriter's memory: no chunk-sized temporaries per append, and the fixed mmap
threshold that keeps the compression filter's large per-chunk buffers out of the I/O thread's
malloc arena (whose free space grew without bound with glibc's dynamic threshold; see
"Memory" in ``storage/_hdf5.py``); and HDF5's own caches while a file grows: its metadata
cache and the process's free lists stay bounded (``storage._hdf5_memory``), measured with
HDF5's own figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import h5py
import numpy as np
import pytest

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import WaveformWriter
from smartmeter_ophyd.storage._hdf5_memory import (
    METADATA_CACHE_BYTES,
    bound_metadata_cache,
    free_list_sizes,
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
glibc = pytest.mark.skipif(not hasattr(_libc, "mallinfo2"), reason="glibc >= 2.33 only")


_ARENA_CHECK = """
import ctypes, ctypes.util, sys
import numpy as np
from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import WaveformWriter

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc.mallinfo2.restype = Mallinfo2
WaveformWriter(sys.argv[1], Measures.VI, 8000, 0.0).close()  # storage is in use
# with the dynamic threshold, freeing this mapped 4 MiB buffer would raise the threshold to
# 4 MiB and the next 1 MiB buffer would come from an arena
big = np.ones(4 << 20, dtype=np.uint8)
del big
before = libc.mallinfo2().hblkhd
buffer = np.ones(1 << 20, dtype=np.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@glibc
def test_a_freed_large_buffer_leaves_later_ones_outside_the_arenas(tmp_path) -> None:
    # In a fresh process: in this one, earlier tests leave free arena chunks that can serve
    # a 1 MiB request before the mmap threshold is consulted at all.
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", _ARENA_CHECK, str(tmp_path / "m.h5")],
                          capture_output=True, text=True, timeout=60, env=env, check=True)
    grown = int(done.stdout.strip())
    assert grown >= 1 << 20, f"a 1 MiB buffer came from a malloc arena ({grown} B mapped)"


def test_appends_across_chunks_allocate_less_than_a_chunk(tmp_path) -> None:
    rng = np.random.default_rng(7)
    writer = WaveformWriter(tmp_path / "m.h5", Measures.VI, 8000, 1_700_000_000.0, {"name": "m"})
    block = 2000  # ~0.25 s at 8 kHz, as the I/O thread hands over
    sent = [rng.standard_normal((block, 6)).astype(np.float32) for _ in range(40)]
    chunk_bytes = writer.chunk_samples * 6 * 4
    try:
        for values in sent[:10]:  # HDF5's caches and the first chunks: not what is measured
            writer.append(values)
        peaks = []
        tracemalloc.start()
        try:
            for values in sent[10:]:
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                writer.append(values)
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
        finally:
            tracemalloc.stop()
        assert writer.samples_written >= 4 * writer.chunk_samples  # chunks were written
    finally:
        writer.close()
    assert max(peaks) < chunk_bytes, (
        f"one append allocated up to {max(peaks) / 1024:.0f} KiB of temporaries, not less "
        f"than a chunk ({chunk_bytes / 1024:.0f} KiB)"
    )
    with h5py.File(writer.path, "r") as f:  # and every row is where it belongs
        expected = np.concatenate(sent)
        for k, channel in enumerate(writer.channels):
            assert np.array_equal(f[channel][()], expected[:, k])
        j = np.arange(expected.shape[0])
        assert np.array_equal(f["time"][()], 1_700_000_000.0 + (j // 8000 + (j % 8000) / 8000))


ROWS = (np.random.default_rng(0).standard_normal((4000, 6)) * 100).astype(np.float32)


def test_a_writer_bounds_its_file_metadata_cache_and_hdf5_keeps_the_bound(tmp_path) -> None:
    writer = WaveformWriter(tmp_path / "m.h5", Measures.VI, 8000, 1.75e9, {"name": "m"},
                            chunk_samples=256)
    try:
        assert writer._file.id.get_mdc_config().max_size == METADATA_CACHE_BYTES
        bound = 32 * 1024  # a smaller bound fills sooner
        bound_metadata_cache(writer._file, bound)
        peak = 0
        for _ in range(60):  # 940 chunks per dataset
            writer.append(ROWS)
            peak = max(peak, writer._file.id.get_mdc_size()[2])
        assert bound // 2 < peak <= bound  # the index filled the cache, and no more
    finally:
        writer.close()


# In a fresh process: the free-list limits are process-wide, set by the first writer.
FREE_LISTS = textwrap.dedent("""
    import json, sys, numpy as np
    from smartmeter_ophyd.protocol import Measures
    from smartmeter_ophyd.storage._hdf5 import WaveformWriter
    from smartmeter_ophyd.storage._hdf5_memory import bound_metadata_cache, free_list_sizes
    rows = (np.random.default_rng(0).standard_normal((4000, 6)) * 100).astype(np.float32)
    writer = WaveformWriter(sys.argv[1], Measures.VI, 8000, 1.75e9, {"name": "m"},
                            chunk_samples=1024)
    bound = 32 * 1024  # fills sooner than the writer's own bound
    bound_metadata_cache(writer._file, bound)
    held, full = [], False
    for k in range(int(sys.argv[2])):
        writer.append(rows)
        full = full or writer._file.id.get_mdc_size()[2] > 0.9 * bound
        if full and k % 20 == 0:
            held.append(sum(free_list_sizes()))
    writer.close()
    print(json.dumps(held))
""")


def test_free_lists_stop_growing_once_the_cache_is_full(tmp_path) -> None:
    assert free_list_sizes() is not None  # the library h5py loaded is found
    done = subprocess.run([sys.executable, "-c", FREE_LISTS, str(tmp_path / "m.h5"), "800"],
                          capture_output=True, text=True, timeout=120, check=True)
    held = json.loads(done.stdout)
    assert len(held) >= 10
    # With HDF5's defaults they grow ~+200 kB per 1000 chunks from here: 170 kB in this test.
    assert max(held) - held[0] < 96 * 1024, held
