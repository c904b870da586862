"""WaveformWriter's transient memory per append: no chunk-sized temporaries.

Chunk-sized temporaries (a 384 KiB concatenation and 128 KiB time-model arrays per chunk at
8 kHz) pushed glibc's dynamic mmap threshold above them, so they came from the I/O thread's
arena, whose free space grew through the soak (``benchmarks/soak.py --diagnose``).  numpy
reports its buffers to tracemalloc, so the peak of one append shows them.
"""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import WaveformWriter


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
