"""A run flown through the RunEngine into a catalog and read back through databroker.

The flyer below is a minimal ophyd-v1 device implementing ``bluesky.protocols`` directly
(Flyable, Collectable, WritesStreamAssets) on top of WaveformWriter + StreamAssets; it feeds
synthetic frames with one packet gap from a thread, so the RE collects several times while the
file grows.  Both back ends are exercised: the embedded catalog (opened by profile name) and a
PostgreSQL-backed ``tiled serve`` started by scripts/postgres.sh.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import databroker
import h5py
import numpy as np
import pytest
from event_model import DocumentNames, schema_validators
from ophyd import Device
from ophyd.status import DeviceStatus, Status

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import (
    GRID_VIEW_LABEL,
    GapAssets,
    StreamAssets,
    WaveformWriter,
    close_client,
    connect_server,
    gap_data_keys,
    gap_grid,
    make_tiled_writer,
    read_gaps,
    read_stream,
    stream_data_keys,
    time_span,
    time_window,
    time_window_hdf5,
    write_server_profile,
)
from tests.run_engines import RunEngine

RATE = 8000
FRAME = 42  # samples per 1008-byte frame at 8 kHz, 3-phase (§4.5)
N_PACKETS = 400
LOST = range(150, 153)  # packets that never arrive
START_TS = 1_700_000_000.125


def synthetic_frames(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All frames as (packets, frame, 6) float32 - including the ones that will be lost."""
    rng = np.random.default_rng(seed)
    return np.arange(N_PACKETS), rng.standard_normal((N_PACKETS, FRAME, 6)).astype(np.float32)


class GapStream:
    """The meter's gaps as a separate collectable (its own stream)."""

    def __init__(self, parent: TestMeter) -> None:
        self.parent = parent
        self.name = f"{parent.name}_gaps"

    def describe_collect(self) -> dict[str, Any]:
        return gap_data_keys(self.parent.name, f"test:{self.parent.name}")

    def get_index(self) -> int:
        return self.parent.gap_assets.get_index()

    def collect_asset_docs(self, index: int | None = None):
        yield from self.parent.gap_assets.collect_asset_docs(index)


class TestMeter(Device):
    """ophyd v1 flyer writing synthetic 3-phase frames (with a packet gap) to HDF5."""

    __test__ = False  # not a pytest class

    def __init__(self, *, name: str, directory: Path, seed: int = 1) -> None:
        super().__init__(name=name)
        self.directory = directory
        self.seed = seed
        self.gaps = GapStream(self)
        self.writer: WaveformWriter | None = None

    def describe_collect(self) -> dict[str, Any]:
        m = Measures.VI
        return stream_data_keys(self.name, m.channels, m.units, f"test:{self.name}")

    def kickoff(self) -> Status:
        path = self.directory / f"{self.name}-{uuid.uuid4().hex[:8]}.h5"
        self.writer = WaveformWriter(
            path,
            Measures.VI,
            RATE,
            START_TS,
            {
                "name": self.name,
                "host": "127.0.0.1",
                "firmware": "2.2",
                "compiled": "test",
                "sampling_reply": {"samplingrate": RATE, "chunksize": FRAME * 24},
            },
        )
        self.assets = StreamAssets(self.writer, self.name, source_label=f"test:{self.name}")
        self.gap_assets = GapAssets(self.writer, self.name, source_label=f"test:{self.name}")
        self._done = DeviceStatus(self)
        packets, frames = synthetic_frames(self.seed)
        writer = self.writer

        def feed() -> None:
            try:
                expected = 0
                for start in range(0, N_PACKETS, 50):  # ~8 collects' worth of batches
                    keep = [p for p in range(start, start + 50) if p not in LOST]
                    if keep and keep[0] != expected:
                        writer.record_gap(expected, keep[0], (keep[0] - expected) * FRAME)
                    writer.append(
                        frames[keep].reshape(-1, 6), packets[keep], np.full(len(keep), FRAME)
                    )
                    expected = keep[-1] + 1
                    threading.Event().wait(0.02)
                writer.close({"samples": int(len(packets) - len(LOST)) * FRAME})
                self._done.set_finished()
            except Exception as exc:  # surfaces in the RE as a failed status
                self._done.set_exception(exc)

        threading.Thread(target=feed, daemon=True).start()
        st = Status()
        st.set_finished()
        return st

    def complete(self) -> DeviceStatus:
        return self._done

    def get_index(self) -> int:
        return self.assets.get_index()

    def collect_asset_docs(self, index: int | None = None):
        yield from self.assets.collect_asset_docs(index)


def fly(meter: TestMeter, stream: str = "meter"):
    yield from bps.open_run(md={"meter": meter.name})
    yield from bps.declare_stream(meter, name=stream, collect=True)
    yield from bps.declare_stream(meter.gaps, name=f"{stream}_gaps", collect=True)
    yield from bps.kickoff(meter, wait=True)
    yield from bps.collect_while_completing([meter], [meter], flush_period=0.02, stream_name=stream)
    yield from bps.collect(meter.gaps, name=f"{stream}_gaps")
    yield from bps.close_run()


def expected_data(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Received samples, their sample-clock positions and the gap's sample index."""
    _, frames = synthetic_frames(seed)
    keep = [p for p in range(N_PACKETS) if p not in LOST]
    values = frames[keep].reshape(-1, 6)
    gap_index = LOST.start * FRAME
    positions = np.arange(values.shape[0])
    positions[gap_index:] += len(LOST) * FRAME
    return values, positions, gap_index


def run_and_check_documents(client: Any, meter: TestMeter) -> str:
    docs: list[tuple[str, dict[str, Any]]] = []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE.subscribe(make_tiled_writer(client))
    (uid,) = RE(fly(meter))
    names = [n for n, _ in docs]
    assert names[0] == "start" and names[-1] == "stop"
    assert docs[-1][1]["exit_status"] == "success"
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    datums = [d for n, d in docs if n == "stream_datum"]
    # several collects happened while the file grew
    assert len({d["indices"]["stop"] for d in datums}) > 2
    return uid


def ref_all_i_l2(path: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["i_l2"][()]


def check_run(run: Any, meter: TestMeter) -> None:
    values, positions, gap_index = expected_data(meter.seed)
    ds = read_stream(run, "meter")
    m = Measures.VI
    got = np.stack([ds[f"{meter.name}_{ch}"].values for ch in m.channels], axis=1)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))  # bit for bit
    np.testing.assert_allclose(ds["time"].values, START_TS + positions / RATE, rtol=0, atol=1e-6)

    for access in ("asset", "http"):
        gaps = read_gaps(run, "meter_gaps", access=access)
        assert gaps["sample_index"].tolist() == [gap_index]
        assert gaps["expected_packet"].tolist() == [LOST.start]
        assert gaps["received_packet"].tolist() == [LOST.stop]
        assert gaps["missing_samples"].tolist() == [len(LOST) * FRAME]
        assert time_span(run, "meter", access=access) == (ds["time"].values[0],
                                                           ds["time"].values[-1])
    with pytest.raises(KeyError, match="no gaps stream 'nope'"):
        read_gaps(run, "nope")

    path = meter.writer.path
    # a window straddling the gap, through the catalog and directly, against numpy on the file
    t0, t1 = START_TS + 0.7, START_TS + 0.9
    win = time_window(run, t0, t1, "meter")
    assert win.attrs["access"] == "asset"  # the catalog's HDF5 assets are local files here
    direct = time_window_hdf5(path, t0, t1)
    with h5py.File(path, "r") as f:
        t_all = f["time"][()]
        sel = (t_all >= t0) & (t_all < t1)
        ref = {ch: f[ch][()][sel] for ch in m.channels}
    for view in (win, time_window(run, t0, t1, "meter", access="http")):
        assert view.sizes["time"] == int(sel.sum()) > 0
        assert view.attrs["first_index"] == direct.attrs["first_index"] == int(np.argmax(sel))
        for ch in m.channels:
            assert np.array_equal(view[f"{meter.name}_{ch}"].values, ref[ch])
            assert np.array_equal(direct[ch].values, ref[ch])
        assert np.array_equal(view["time"].values, t_all[sel])
    # channel subset, windows at and beyond both ends, empty window: http == asset == numpy
    t_end = float(t_all[-1])
    for lo, hi in ((START_TS - 1, START_TS + 0.01), (t_end - 0.01, t_end + 1), (t0, t0)):
        want = (t_all >= lo) & (t_all < hi)
        for access in ("http", "asset"):
            view = time_window(run, lo, hi, "meter", keys=[f"{meter.name}_i_l2"], access=access)
            assert list(view.data_vars) == [f"{meter.name}_i_l2"]
            assert np.array_equal(view[f"{meter.name}_i_l2"].values, ref_all_i_l2(path)[want])
            assert np.array_equal(view["time"].values, t_all[want])

    grid = gap_grid(run, "meter", t0=t0, t1=t1)
    assert grid.attrs["view"] == GRID_VIEW_LABEL
    n_missing = len(LOST) * FRAME
    assert grid.sizes["position"] == win.sizes["time"] + n_missing
    col = grid[f"{meter.name}_v_l1"].values
    assert int(np.isnan(col).sum()) == n_missing == int((~grid["received"].values).sum())
    assert np.array_equal(col[grid["received"].values], ref["v_l1"])
    # the grid's time axis is regular at 1/rate across the gap
    np.testing.assert_allclose(np.diff(grid["time"].values), 1 / RATE, atol=1e-6)
    # raw stream has no NaN: gaps exist only as rows of the gaps stream
    assert not np.isnan(ds[f"{meter.name}_v_l1"].values).any()


def test_embedded_catalog_roundtrip_via_profile(embedded_catalog) -> None:
    meter = TestMeter(name="lab1", directory=embedded_catalog.data_directory, seed=3)
    uid = run_and_check_documents(embedded_catalog.client, meter)
    client = databroker.from_profile(embedded_catalog.profile)
    try:
        run = client[uid]
        assert run.start["meter"] == "lab1"
        check_run(run, meter)
        with h5py.File(meter.writer.path, "r") as f:
            assert json.loads(f.attrs["stop_summary"]) == {
                "samples": (N_PACKETS - len(LOST)) * FRAME
            }
            assert f["packets/packet"].shape[0] == N_PACKETS - len(LOST)
    finally:
        close_client(client)


def test_shared_stream_reads_one_meter_by_prefix(embedded_catalog) -> None:
    # "lab_b" extends "lab": its keys start with "lab_" but are not lab's
    meters = [
        TestMeter(name=name, directory=embedded_catalog.data_directory, seed=seed)
        for name, seed in (("lab", 7), ("lab_b", 8))
    ]

    def fly_shared():
        yield from bps.open_run()
        yield from bps.declare_stream(*meters, name="meter", collect=True)
        yield from bps.kickoff_all(*meters, wait=True)
        yield from bps.collect_while_completing(meters, meters, flush_period=0.02,
                                                stream_name="meter")
        yield from bps.close_run()

    engine = RunEngine({})
    engine.subscribe(make_tiled_writer(embedded_catalog.client))
    (uid,) = engine(fly_shared())
    client = databroker.from_profile(embedded_catalog.profile)
    try:
        run = client[uid]
        channels = Measures.VI.channels
        for meter in meters:
            values, positions, _ = expected_data(meter.seed)
            own = [f"{meter.name}_{ch}" for ch in channels]
            ds = read_stream(run, "meter", prefix=meter.name)
            assert sorted(ds.data_vars) == sorted(own)
            assert ds.attrs["time_key"] == f"{meter.name}_time"
            got = np.stack([ds[k].values for k in own], axis=1)
            assert np.array_equal(got.view(np.uint32), values.view(np.uint32))
            np.testing.assert_allclose(ds["time"].values, START_TS + positions / RATE,
                                       rtol=0, atol=1e-6)
            for access in ("asset", "http"):
                win = time_window(run, START_TS, START_TS + 0.01, "meter", prefix=meter.name,
                                  access=access)
                assert sorted(win.data_vars) == sorted(own)
                assert np.array_equal(win[own[0]].values, values[: RATE // 100, 0])
        # without prefix: every key, and the time key is ambiguous
        with pytest.raises(ValueError, match="pass prefix="):
            read_stream(run, "meter")
        assert len(run["meter"].read().data_vars) == 2 * (len(channels) + 1)
    finally:
        close_client(client)


def test_postgres_server_roundtrip(postgres_server, tmp_path) -> None:
    uri, key = postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"]
    hdf5_dir = Path(postgres_server["TILED_HDF5_DIR"])
    meter = TestMeter(name="lab2", directory=hdf5_dir, seed=4)
    writing = connect_server(uri, key)
    try:
        uid = run_and_check_documents(writing, meter)
    finally:
        close_client(writing)
    write_server_profile("smartmeter-pg-test", uri, profiles_dir=tmp_path / "profiles")
    client = databroker.from_profile("smartmeter-pg-test", api_key=key)
    try:
        run = client[uid]
        assert run.start["meter"] == "lab2"
        check_run(run, meter)
    finally:
        close_client(client)


def test_server_rejects_bad_key(postgres_server) -> None:
    from tiled.client import from_context
    from tiled.client.context import Context

    # connect_server's from_uri, with the context in hand: the refusal leaves it open
    context, path = Context.from_any_uri(postgres_server["TILED_URI"], api_key="wrongkey123")
    try:
        with pytest.raises(Exception, match="401|Invalid API key|nauthori"):
            from_context(context, node_path_parts=path)["x"]
    finally:
        context.close()
