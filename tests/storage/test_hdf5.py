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


def _model_times(start: float, rate: int, positions: np.ndarray) -> np.ndarray:
    """The documented time model, written out independently of the writer (§4.3)."""
    dec = decimation(rate)
    spacing = 1 / rate if dec.uniform else dec.keep_every / dec.internal_rate
    return start + positions // rate + (positions % rate) * spacing


@pytest.mark.parametrize("rate", [1000, 128])  # uniform and bursty (§4.3)
def test_rebase_start_rewrites_written_times_and_moves_later_ones(tmp_path, rate) -> None:
    reply_start, actual_start = 1_700_000_100.0, 1_700_000_099.999  # §6.4: ≈1 ms early
    w = WaveformWriter(tmp_path / "r.h5", Measures.VI_L1, rate, reply_start, {"name": "sched"},
                       chunk_samples=64)
    block = np.arange(100, dtype=np.float32).repeat(2).reshape(100, 2)
    w.append(block)  # 100 rows: on disk over two chunks
    w.record_gap(3, 5, 40)
    w.append(block[:30])  # 30 rows after the gap, still buffered
    w.flush()
    w.append(block[:10])  # buffered when the origin moves
    with h5py.File(w.path, "r", libver="latest", swmr=True) as reader:
        before = reader["time"][()]
        np.testing.assert_allclose(before[:2], _model_times(reply_start, rate, np.arange(2)),
                                   rtol=0, atol=1e-9)
        assert w.rebase_start(actual_start) is True
        reader["time"].refresh()
        seen_live = reader["time"][()]  # an open SWMR reader sees the rewritten rows
    w.record_gap(7, 8, 5)
    w.append(block[:20])  # after the move
    assert w.rebase_start(actual_start) is False  # same origin: nothing to do
    w.close()

    positions = np.arange(160)
    positions[100:] += 40
    positions[140:] += 5
    expected = _model_times(actual_start, rate, positions)
    with h5py.File(w.path, "r") as f:
        times = f["time"][()]
        attrs = dict(f.attrs)
    assert times.shape == (160,)
    np.testing.assert_allclose(times, expected, rtol=0, atol=1e-6)
    assert times[0] == actual_start
    np.testing.assert_allclose(seen_live, expected[: len(seen_live)], rtol=0, atol=1e-6)
    assert len(seen_live) == 130  # the flushed rows
    assert attrs["start_ts"] == actual_start
    assert attrs["start_ts_reply"] == reply_start
    assert attrs["start_ts_source"] == "stop reply start_ts"
    assert w.start_ts == actual_start


def test_rebase_start_refuses_bad_origin_and_closed_file(tmp_path) -> None:
    w = WaveformWriter(tmp_path / "x.h5", Measures.VI_L1, 8000, 5.0, {"name": "lab-3"})
    with h5py.File(w.path, "r", libver="latest", swmr=True) as reader:
        assert reader.attrs["start_ts_source"] == "sample reply startTs"
    with pytest.raises(ValueError, match="lab-3.*finite"):
        w.rebase_start(float("nan"))
    w.close()
    with pytest.raises(RuntimeError, match="lab-3.*closed"):
        w.rebase_start(4.999)


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


def test_whole_chunks_are_visible_while_writing_and_the_rest_at_close(tmp_path) -> None:
    w = WaveformWriter(tmp_path / "c.h5", Measures.VI_L1, 8000, 0.0, {"name": "chunky"},
                       chunk_samples=64)
    data = np.arange(400, dtype=np.float32).reshape(200, 2)
    w.append(data[:50])
    assert w.samples_written == 0  # not a whole chunk yet
    w.append(data[50:100])
    assert w.samples_written == 64 and w.samples_appended == 100
    with h5py.File(w.path, "r", libver="latest", swmr=True) as reader:
        assert reader["v_l1"].shape == (64,)
        assert np.array_equal(reader["i_l1"][()], data[:64, 1])
        assert w.live_index(max_lag_s=60.0) == 64  # rows waited less than that: no write
        assert w.live_index(max_lag_s=0.0) == 100  # they waited longer: a partial chunk
        reader["v_l1"].refresh()
        assert reader["v_l1"].shape == (100,)
    w.append(data[100:])
    w.close()
    with h5py.File(w.path, "r") as f:
        assert f.attrs["compression"] == "blosc2-zstd1-shuffle"
        assert f["v_l1"].id.get_create_plist().get_filter(0)[0] == 32026  # Blosc2
        assert np.array_equal(f["v_l1"][()], data[:, 0]) and np.array_equal(f["i_l1"][()], data[:, 1])
        np.testing.assert_allclose(f["time"][()], np.arange(200) / 8000, rtol=0, atol=1e-12)


def _emulated(seconds: float) -> np.ndarray:
    """8 kHz x 6 channels from the emulator's own physical model (§4.2 units)."""
    from smartmeter_ophyd.emulator._clock import MeterClock
    from smartmeter_ophyd.emulator._grid import GridModel
    from smartmeter_ophyd.emulator._sampling import SamplingEngine

    start = 1_750_000_000.25
    engine = SamplingEngine(GridModel(seed=3), MeterClock(0.001, 2.0, anchor_true=start),
                            circuit=1, noise_seed=3, keep_truth=False, name="bytes")
    engine.start(Measures.VI, 8000, at_true=start)
    return np.concatenate([engine.produce(start + k / 20) for k in range(1, int(seconds * 20) + 1)])


def _bytes_per_sample(tmp_path, name: str, values: np.ndarray) -> tuple[float, np.ndarray]:
    w = WaveformWriter(tmp_path / f"{name}.h5", Measures.VI, 8000, 1_750_000_000.25, {"name": name})
    frame = 42  # samples per 1008-byte frame at 8 kHz, 3-phase (§4.5)
    for first in range(0, values.shape[0], 8 * frame):  # the client's typical block
        block = values[first : first + 8 * frame]
        frames = np.full(-(-block.shape[0] // frame), frame)
        frames[-1] = block.shape[0] - frame * (frames.size - 1)
        w.append(block, packets=np.arange(frames.size) + first // frame, frame_samples=frames)
    w.close()
    with h5py.File(w.path, "r") as f:
        back = np.stack([f[ch][()] for ch in Measures.VI.channels], axis=1)
    return (tmp_path / f"{name}.h5").stat().st_size / values.shape[0], back


def test_compressed_file_costs_no_more_per_sample_for_a_short_run(tmp_path) -> None:
    values = _emulated(60.0)
    short = values[: 10 * 8000]
    long_cost, long_back = _bytes_per_sample(tmp_path, "long", values)
    short_cost, short_back = _bytes_per_sample(tmp_path, "short", short)
    assert np.array_equal(long_back.view(np.uint32), values.view(np.uint32))  # lossless
    assert np.array_equal(short_back.view(np.uint32), short.view(np.uint32))
    assert long_cost <= 16.0, long_cost  # 32 B raw: 24 B of float32 channels + 8 B of time
    assert short_cost <= long_cost * 1.1, (short_cost, long_cost)


def test_rewritten_times_cover_every_row_buffered_ones_included(tmp_path) -> None:
    w = WaveformWriter(tmp_path / "r.h5", Measures.VI_L1, 8000, 100.0, {"name": "m"},
                       chunk_samples=64)
    data = np.arange(2 * 150, dtype=np.float32).reshape(150, 2)
    w.append(data)  # two whole chunks written, 22 rows still buffered
    times = 200.0 + np.arange(150) * 1e-3
    with pytest.raises(ValueError, match="smartmeter m: 149 times for 150 samples"):
        w.rewrite_times(times[:-1], "model")
    w.rewrite_times(times, "model", ["a note"])
    w.close()
    with h5py.File(w.path, "r") as f:
        np.testing.assert_array_equal(f["time"][()], times)
        np.testing.assert_array_equal(f["v_l1"][()], data[:, 0])
        assert f.attrs["time_source"] == "model"
