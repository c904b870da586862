"""time_window internals: locating a window over HTTP (few requests, exact) and which catalog
data sources may be read directly as local HDF5 assets."""

from __future__ import annotations

import numpy as np
import pytest

from smartmeter_ophyd.storage._readback import _LOCATE_MARGIN, _locate_over_http

RATE = 8000


def _times(gap_at: int, gap_samples: int, n: int) -> np.ndarray:
    positions = np.arange(n, dtype=np.int64)
    positions[gap_at:] += gap_samples
    return 1_700_000_000.0 + positions / RATE


class CountingReader:
    def __init__(self, values: np.ndarray) -> None:
        self.values, self.calls = values, 0

    def __call__(self, a: int, b: int) -> np.ndarray:
        self.calls += 1
        return self.values[max(0, a) : b]


@pytest.mark.parametrize(
    ("gap_samples", "max_calls"),
    [(0, 3), (100, 3), (5 * _LOCATE_MARGIN, 40)],  # the last one defeats interpolation
)
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_locate_matches_numpy(gap_samples: int, max_calls: int, where: float) -> None:
    n = 2_000_000
    times = _times(n // 3, gap_samples, n)
    t0 = float(times[int(n * where)]) + 0.3 / RATE
    t1 = t0 + 20.0
    reader = CountingReader(times)
    i0, i1, got = _locate_over_http(reader, n, t0, t1)
    assert (i0, i1) == (np.searchsorted(times, t0), np.searchsorted(times, t1))
    assert np.array_equal(got, times[i0:i1])
    assert reader.calls <= max_calls


def test_locate_outside_and_unbounded() -> None:
    times = _times(10, 50, 1000)
    for t0, t1 in (
        (times[0] - 5, times[0] - 1),
        (times[-1] + 1, times[-1] + 2),
        (-np.inf, np.inf),
        (times[5], times[5]),
    ):
        i0, i1, got = _locate_over_http(CountingReader(times), len(times), t0, t1)
        assert (i0, i1) == (np.searchsorted(times, t0), np.searchsorted(times, t1))
        assert np.array_equal(got, times[i0:i1])
    assert _locate_over_http(CountingReader(times[:0]), 0, 0.0, 1.0)[:2] == (0, 0)


def _source(uri: str, **changes) -> dict:
    source = {
        "mimetype": "application/x-hdf5",
        "parameters": {"dataset": "/v_l1", "swmr": True},
        "assets": [{"data_uri": uri}],
    }
    source.update(changes)
    return source


def test_only_single_local_file_hdf5_sources_are_read_as_assets() -> None:
    from smartmeter_ophyd.storage._readback import _local_hdf5_asset

    assert _local_hdf5_asset([_source("file://localhost/data/a%20b.h5")]) == (
        "/data/a b.h5",
        "/v_l1",
    )
    assert _local_hdf5_asset([_source("file:///data/a.h5")]) == ("/data/a.h5", "/v_l1")
    for sources in (
        None,
        [],
        [_source("file://otherhost/data/a.h5")],
        [_source("s3://bucket/a.h5")],
        [_source("file:///a.h5", mimetype="multipart/related;type=application/x-hdf5")],
        [_source("file:///a.h5", parameters={"dataset": "/v", "slice": ["0:10"]})],
        [_source("file:///a.h5"), _source("file:///b.h5")],
        [_source("file:///a.h5", assets=[{"data_uri": "file:///a.h5"}] * 2)],
    ):
        assert _local_hdf5_asset(sources) is None, sources


def test_asset_reads_stop_at_the_catalogs_shape(tmp_path) -> None:
    import h5py

    from smartmeter_ophyd.storage import StreamNode
    from smartmeter_ophyd.storage._readback import _read_assets

    path = tmp_path / "m.h5"
    times = _times(300, 20, 1000)
    with h5py.File(path, "w") as f:
        f["time"] = times
        f["v"] = np.arange(1000, dtype=np.float32)

    def node(key: str, dataset: str, rows: int, dtype: str) -> StreamNode:
        return StreamNode(key, "unused", (rows,), np.dtype(dtype), (str(path), dataset))

    nodes = {"m_time": node("m_time", "/time", 600, "<f8"), "m_v": node("m_v", "/v", 600, "<f4")}
    i0, i1, got_t, cols = _read_assets(nodes, ["m_time", "m_v"], 600, -np.inf, np.inf)
    assert (i0, i1) == (0, 600)  # rows 600..999 exist in the file but not yet in the catalog
    assert np.array_equal(got_t, times[:600]) and np.array_equal(cols["m_v"], np.arange(600))
    nodes["m_v"] = node("m_v", "/v", 1200, "<f4")
    with pytest.raises(ValueError, match="catalog declares 1200"):
        _read_assets(nodes, ["m_time", "m_v"], 600, -np.inf, np.inf)
