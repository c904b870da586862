"""WaveformWriter's memory: no chunk-sized temporaries per append, and the fixed mmap
threshold that keeps the compression filter's large per-chunk buffers out of the I/O thread's
malloc arena (whose free space grew without bound with glibc's dynamic threshold; see
"Memory" in ``storage/_hdf5.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import tracemalloc

import h5py
import numpy as np
import pytest

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import WaveformWriter

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
