"""HDF5's own memory while a waveform file grows: its metadata cache and the process's free
lists stay bounded (``storage._hdf5_memory``), measured with HDF5's own figures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage._hdf5 import WaveformWriter
from smartmeter_ophyd.storage._hdf5_memory import (
    METADATA_CACHE_BYTES,
    bound_metadata_cache,
    free_list_sizes,
)

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
