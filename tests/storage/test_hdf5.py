"""WaveformWriter and the read-back helpers on a bare HDF5 file (no catalog)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from smartmeter_ophyd.protocol import Measures, decimation
from smartmeter_ophyd.storage import (
    WaveformWriter,
    nan_grid,
    read_gaps_hdf5,
    search_sorted,
    time_window_hdf5,
)


def test_small_appends_are_buffered_until_flush(tmp_path) -> None:
    w = WaveformWriter(tmp_path / "m.h5", Measures.VI_L1, 8000, 100.0, {"name": "m"})
    data = np.arange(200, dtype=np.float32).reshape(100, 2)
    w.append(data[:60])
    w.append(data[60:])
    assert w.samples_appended == 100 and w.samples_written == 0
    assert w.flush() == 100
    with h5py.File(w.path, "r", swmr=True) as f:  # visible to a SWMR reader while open
        assert np.array_equal(f["v_l1"][()], data[:, 0])
        assert f["i_l1"].attrs["units"] == "mA"
    w.close({"samples": 100})
    assert w.samples_written == 100


def test_bursty_rate_time_model(tmp_path) -> None:
    rate = 128  # bursty: 128 samples at 8000/62 Hz at the start of each second (§4.3)
    w = WaveformWriter(tmp_path / "b.h5", Measures.VI_L2, rate, 10.0)
    w.append(np.zeros((300, 2), dtype=np.float32))
    w.close()
    with h5py.File(w.path, "r") as f:
        t = f["time"][()]
    j = np.arange(300)
    dec = decimation(rate)
    expected = 10.0 + j // rate + (j % rate) * dec.keep_every / dec.internal_rate
    np.testing.assert_allclose(t, expected, atol=1e-9)
    assert t[128] == 11.0


def test_gap_shifts_time_and_grid_has_nan(tmp_path) -> None:
    w = WaveformWriter(tmp_path / "g.h5", Measures.VI_L1, 1000, 0.0)
    a = np.ones((50, 2), dtype=np.float32)
    w.append(a, packets=[0, 1], frame_samples=[25, 25])
    w.record_gap(2, 4, 50)
    w.append(2 * a, packets=[4, 5], frame_samples=[25, 25])
    w.close()
    gaps = read_gaps_hdf5(w.path)
    assert gaps["sample_index"].tolist() == [50] and gaps["missing_samples"].tolist() == [50]
    ds = time_window_hdf5(w.path, -1, 1)
    assert ds["time"].values[50] == pytest.approx(0.1)  # 50 samples skipped
    grid = nan_grid(ds, gaps)
    assert grid.sizes["position"] == 150
    assert np.isnan(grid["v_l1"].values[50:100]).all()
    assert not np.isnan(ds["v_l1"].values).any()


def test_bad_input_names_the_meter(tmp_path) -> None:
    w = WaveformWriter(tmp_path / "e.h5", Measures.VI, 8000, 0.0, {"name": "lab-9"})
    with pytest.raises(TypeError, match="lab-9.*float32"):
        w.append(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="lab-9.*shape"):
        w.append(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="lab-9.*frames carry"):
        w.append(np.zeros((3, 6), dtype=np.float32), packets=[0], frame_samples=[2])
    with pytest.raises(ValueError, match="lab-9"):
        w.record_gap(5, 5, 0)
    w.close()
    with pytest.raises(RuntimeError, match="lab-9.*closed"):
        w.append(np.zeros((1, 6), dtype=np.float32))


@pytest.mark.parametrize("n", [1, 10, 5000, 100_000])
def test_search_sorted_matches_numpy(n) -> None:
    rng = np.random.default_rng(n)
    arr = np.sort(rng.uniform(0, 100, n))
    reads = []

    def read(a, b):
        reads.append((a, b))
        return arr[a:b]

    for t in [-1.0, 0.0, 37.5, arr[n // 2], 100.0, 200.0]:
        for side in ("left", "right"):
            assert search_sorted(read, n, t, side) == np.searchsorted(arr, t, side)
    assert sum(b - a for a, b in reads) < 12 * 2 * 6 * 4096 + 12
