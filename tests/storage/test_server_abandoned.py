"""Runs whose acquisition process died, written by ``JournalSink.for_server``'s writer process
into a real Tiled server (PostgreSQL-backed, scripts/postgres.sh): nothing the journal holds
is missing from the catalog.

A ``TiledWriter`` keeps events, and StreamDatums until they span its batch (10000 rows), for
the stop document.  A run without one is abandoned by the writer; the test fails if what the
``TiledWriter`` still held never reaches the server:

* a flyer's journal (16674 samples with a packet gap, no stop) left in a dead session is
  adopted by the writer at its start: every sample and the gap read back, bit for bit;
* a run fed to the sink without its stop, then the sink closed (the writer's stdin closes, as
  when the acquisition process dies): every event reads back;
* the writer killed (SIGKILL) while the run is partly on the server: its successor deletes
  the partial run and rewrites it from the journal - every sample, and the stop.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import pytest

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import (
    JournalSink,
    close_client,
    connect_server,
    read_gaps,
    read_stream,
)
from tests.run_engines import RunEngine

from .test_direct_writer import Readings
from .test_run_roundtrip import FRAME, LOST, RATE, START_TS, TestMeter, expected_data, fly
from .test_sink import _journal_a_run

WAIT_S = 60.0
N_EVENTS = 12


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _events_plan(readings: Readings) -> Any:
    yield from bps.open_run()
    for _ in range(N_EVENTS):
        yield from bps.trigger_and_read([readings], name="primary")
    yield from bps.close_run()


def _check_samples(run: Any, meter: TestMeter) -> None:
    values, positions, gap_index = expected_data(meter.seed)
    assert values.shape[0] > 10000  # more than one TiledWriter batch
    for ch in Measures.VI.channels:  # what the catalog declares, not only the file
        assert run["meter"][f"{meter.name}_{ch}"].shape[0] == values.shape[0], ch
    samples = read_stream(run, "meter")
    got = np.stack([samples[f"{meter.name}_{ch}"].values for ch in Measures.VI.channels],
                   axis=1)
    assert got.shape == values.shape
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))
    np.testing.assert_allclose(samples["time"].values, START_TS + positions / RATE,
                               rtol=0, atol=1e-6)
    gaps = read_gaps(run, "meter_gaps")
    assert gaps["sample_index"].tolist() == [gap_index]
    assert gaps["missing_samples"].tolist() == [len(LOST) * FRAME]


@pytest.mark.service
def test_abandoned_runs_reach_the_server_whole(postgres_server, tmp_path) -> None:
    uri, key = postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"]
    root = tmp_path / "journal"
    dead = root / "deadhost-1-abcdef"  # no sink lock: its acquisition process died
    dead.mkdir(parents=True)
    meter = TestMeter(name="abnd", directory=Path(postgres_server["TILED_HDF5_DIR"]), seed=41)
    uid_flyer = _journal_a_run(dead / "run.docs", meter, keep_stop=False)

    sink = JournalSink.for_server(uri, key, root)
    try:
        assert sink.wait_ready(WAIT_S), f"the writer did not start, see {sink.writer_log}"
        _wait_for(lambda: (dead / f"{uid_flyer}.orphaned").exists(), "the adopted journal")
        engine = RunEngine({})
        engine.subscribe(lambda name, doc: sink(name, doc) if name != "stop" else None)
        (uid_events,) = engine(_events_plan(Readings("cut", {"count": 3, "level": 0.5})))
    finally:
        sink.close()
    assert (sink.session / f"{uid_events}.orphaned").exists()
    log = sink.writer_log.read_text()
    assert "INCOMPLETE" not in log, log

    client = connect_server(uri, key)
    try:
        run = client[uid_flyer]
        assert run.metadata.get("stop") is None
        _check_samples(run, meter)

        events = client[uid_events]
        assert events.metadata.get("stop") is None
        table = events["primary"].read()
        assert table["cut_count"].values.tolist() == [3] * N_EVENTS
        assert table["cut_level"].values.tolist() == [0.5] * N_EVENTS
    finally:
        close_client(client)


@pytest.mark.service
def test_writer_killed_mid_run_rewrites_the_run_on_the_server(postgres_server, tmp_path) -> None:
    uri, key = postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"]
    meter = TestMeter(name="kilsrv", directory=Path(postgres_server["TILED_HDF5_DIR"]), seed=42)
    sink = JournalSink.for_server(uri, key, tmp_path / "journal")
    reader = connect_server(uri, key)
    killed: list[int] = []
    start_uid: list[str] = []

    def kill_once_written(name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            start_uid.append(doc["uid"])
        if name != "stream_datum" or killed:
            return
        # the writer has created the run: a partial run is on the server when it dies
        _wait_for(lambda: start_uid[0] in reader, "the writer to create the run")
        pid = sink.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    try:
        assert sink.wait_ready(WAIT_S), f"the writer did not start, see {sink.writer_log}"
        engine = RunEngine({})
        engine.subscribe(sink)
        engine.subscribe(kill_once_written)
        (uid,) = engine(fly(meter))
        assert killed and sink.writer_pid != killed[0] and sink.restarts == 1
        assert not (sink.session / f"{uid}.docs").exists()
        run = reader[uid]
        assert run.metadata["stop"]["exit_status"] == "success"
        _check_samples(run, meter)
    finally:
        sink.close()
        close_client(reader)
