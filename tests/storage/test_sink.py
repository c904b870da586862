"""The document sink: journal in the RunEngine's process, a writer process fills the catalog.

* a run recorded through ``catalog.document_sink()`` reads back bit for bit (samples, time,
  gaps) through ``databroker.from_profile`` the moment ``RE(...)`` returns, and its journal is
  gone;
* the writer process killed (SIGKILL) in the middle of a run: the sink restarts it, the new
  writer deletes the partial run and rewrites it from the journal - nothing lost;
* the journals of a dead acquisition process (no sink, no writer) are adopted by the next
  writer: a finished run is written whole, an unfinished one as far as it goes and its
  journal is kept as ``*.orphaned``;
* a run the writer cannot write fails the RunEngine at its stop document, naming the run
  and the key, and its journal is kept as ``*.failed``;
* the writer writes what it has applied as soon as the journal goes quiet, not at its next
  live period: a run's events are in the catalog before its stop document (the stop then
  has little left to do).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import databroker
import pytest

from smartmeter_ophyd.storage import CatalogWriteError, JournalSink, JournalWriter, close_client
from tests.run_engines import RunEngine

from .test_direct_writer import Readings
from .test_run_roundtrip import TestMeter, check_run, fly

WAIT_S = 60.0


@pytest.fixture
def sink(embedded_catalog) -> Any:
    sink = embedded_catalog.document_sink()
    assert sink.wait_ready(WAIT_S), f"the writer did not start, see {sink.writer_log}"
    return sink


def _read(catalog: Any, uid: str) -> tuple[Any, Any]:
    client = databroker.from_profile(catalog.profile)
    return client, client[uid]


def test_run_is_complete_in_the_catalog_when_the_run_engine_returns(
    embedded_catalog, sink
) -> None:
    meter = TestMeter(name="snk", directory=embedded_catalog.data_directory, seed=21)
    engine = RunEngine({})
    engine.subscribe(sink)
    (uid,) = engine(fly(meter))
    assert not (sink.session / f"{uid}.docs").exists()
    client, run = _read(embedded_catalog, uid)
    try:
        assert run.metadata["stop"]["exit_status"] == "success"
        check_run(run, meter)
    finally:
        close_client(client)


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_writer_killed_mid_run_loses_nothing(embedded_catalog, sink) -> None:
    meter = TestMeter(name="kill", directory=embedded_catalog.data_directory, seed=22)
    reader = embedded_catalog.open()
    killed: list[int] = []
    restarts = sink.restarts

    def kill_once_written(name: str, doc: dict[str, Any]) -> None:
        if name != "stream_datum" or killed:
            return
        uid = start_uid[0]
        # the writer has created the run: a partial run is in the catalog when it dies
        _wait_for(lambda: uid in reader, "the writer to create the run")
        pid = sink.writer_pid
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    start_uid: list[str] = []
    engine = RunEngine({})
    engine.subscribe(sink)
    engine.subscribe(lambda name, doc: start_uid.append(doc["uid"]) if name == "start" else None)
    engine.subscribe(kill_once_written)
    try:
        (uid,) = engine(fly(meter))
    finally:
        close_client(reader)
    assert killed and sink.writer_pid != killed[0]
    assert sink.restarts == restarts + 1
    client, run = _read(embedded_catalog, uid)
    try:
        check_run(run, meter)
        assert run.metadata["stop"]["exit_status"] == "success"
    finally:
        close_client(client)


def _journal_a_run(path: Path, meter: TestMeter, keep_stop: bool) -> str:
    """What a dead acquisition process leaves: a journal, no sink lock, no writer."""
    with JournalWriter(path) as journal:
        engine = RunEngine({})
        engine.subscribe(
            lambda name, doc: journal.append(name, doc) if keep_stop or name != "stop" else None
        )
        (uid,) = engine(fly(meter))
    final = path.with_name(f"{uid}.docs")
    path.rename(final)
    return uid


def test_journals_of_a_dead_process_are_adopted(embedded_catalog, sink, tmp_path) -> None:
    # written elsewhere, then moved in: a session without locks is dead for any writer
    staging = tmp_path / f"deadhost-1-{uuid.uuid4().hex[:6]}"
    staging.mkdir()
    finished = TestMeter(name="orph", directory=embedded_catalog.data_directory, seed=23)
    cut = TestMeter(name="orphcut", directory=embedded_catalog.data_directory, seed=24)
    uid_finished = _journal_a_run(staging / "a.docs", finished, keep_stop=True)
    uid_cut = _journal_a_run(staging / "b.docs", cut, keep_stop=False)
    dead = embedded_catalog.journal_directory / staging.name
    staging.rename(dead)

    os.kill(sink.writer_pid, signal.SIGKILL)  # the next writer adopts at start-up
    _wait_for(lambda: sink._process.poll() is not None, "the writer to die")
    assert sink.wait_ready(WAIT_S)
    _wait_for(lambda: (dead / f"{uid_cut}.orphaned").exists(), "the unfinished run's journal")
    assert sorted(p.name for p in dead.iterdir()) == [f"{uid_cut}.orphaned"]

    client = databroker.from_profile(embedded_catalog.profile)
    try:
        check_run(client[uid_finished], finished)
        assert client[uid_finished].metadata["stop"]["exit_status"] == "success"
        partial = client[uid_cut]
        assert "stop" not in partial.metadata or not partial.metadata["stop"]
        assert partial["meter"]["orphcut_v_l1"].shape[0] > 0
    finally:
        close_client(client)


def test_a_run_the_writer_refuses_fails_at_its_stop(embedded_catalog, sink) -> None:
    readings = Readings("spectrum", {"counts": [1.0] * 64})

    def plan() -> Any:
        yield from bps.open_run()
        yield from bps.trigger_and_read([readings], name="primary")
        yield from bps.close_run()

    engine = RunEngine({})
    engine.subscribe(sink)
    with pytest.raises(CatalogWriteError, match="spectrum_counts") as info:
        engine(plan())
    failed = list(sink.session.glob("*.failed"))
    assert len(failed) == 1 and failed[0].stem in str(info.value)
    # the sink goes on with the next run
    meter = TestMeter(name="after", directory=embedded_catalog.data_directory, seed=25)
    (uid,) = engine(fly(meter))
    client, run = _read(embedded_catalog, uid)
    try:
        check_run(run, meter)
    finally:
        close_client(client)


def test_a_quiet_journal_is_written_before_the_stop(embedded_catalog, tmp_path) -> None:
    # a live period far beyond the test: only the quiet-journal flush can write the rows
    sink = JournalSink(embedded_catalog.writer_config, tmp_path / "journal", live_period=3600)
    reader = embedded_catalog.open()
    readings = Readings("quiet", {"count": 3, "level": 0.5})
    seen: list[int] = []

    def rows(uid: str) -> int:
        try:
            return len(reader[uid]["primary"].base["internal"].read())
        except KeyError:
            return 0

    def plan() -> Any:
        uid = yield from bps.open_run()
        for _ in range(3):
            yield from bps.trigger_and_read([readings], name="primary")
        deadline = time.monotonic() + 5.0
        while not seen and time.monotonic() < deadline:
            yield from bps.sleep(0.05)
            if rows(uid) == 3:
                seen.append(1)
        yield from bps.close_run()
        return uid

    try:
        assert sink.wait_ready(WAIT_S), f"the writer did not start, see {sink.writer_log}"
        engine = RunEngine({})
        engine.subscribe(sink)
        (uid,) = engine(plan())
        assert seen, "the events were not in the catalog before the stop document"
        assert rows(uid) == 3
    finally:
        sink.close()
        close_client(reader)
