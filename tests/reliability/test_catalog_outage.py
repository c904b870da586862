"""The catalog unavailable during a run (issue 9, disk and catalog faults).

The RunEngine writes through the journal sink (``storage._service.JournalSink``): every
document is on disk before any catalog sees it.  With a catalog the writer cannot open, the
run still records every sample, its journal stays on disk, and replaying the journal into
the catalog once it is back gives the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import plans
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.storage import (
    make_tiled_writer,
    read_stream,
    replay_journal,
)
from smartmeter_ophyd.storage._service import JournalSink
from tests.run_engines import RunEngine
from tests.storage.test_replay import journal_of, plain_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def unreachable_sink(embedded_catalog, tmp_path):
    config = dict(embedded_catalog.writer_config)
    config["uri"] = f"sqlite:///{tmp_path}/no-such-directory/catalog.db"  # cannot be opened
    sink = JournalSink(config, tmp_path / "journals", close_timeout=3.0, raise_on_failure=False,
                       keep_journals=True)
    yield sink
    sink.close(timeout=10)


def test_documents_survive_a_catalog_outage_and_replay_into_it(
    fleet_factory, embedded_catalog, unreachable_sink
) -> None:
    fleet = fleet_factory(1)
    meter = SmartMeter(*fleet.addresses[0], name="m1",
                       data_directory=embedded_catalog.data_directory, timeout=3.0)
    engine = RunEngine({})
    engine.subscribe(unreachable_sink)
    try:
        started = time.monotonic()
        (uid,) = engine(plans.synchronized_fly([meter], 1.0))
        took = time.monotonic() - started
        received = meter.last_summary.received_samples
    finally:
        meter.destroy()
    assert took < 30  # the outage costs at most the sink's close_timeout
    assert received == fleet.truth(0).sent_samples > 0
    assert uid not in embedded_catalog.client
    (journal,) = [p for p in Path(unreachable_sink.session).rglob("*") if uid in p.name]
    replayed = replay_journal(journal, make_tiled_writer(embedded_catalog.client))
    assert replayed > 0
    run = embedded_catalog.client[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert read_stream(run, "m1", prefix="m1").sizes["time"] == received


def smartmeter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smartmeter_ophyd.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    # a private Tiled profile directory: the command registers the embedded catalog there
    return {**os.environ, "TILED_PROFILES": str(tmp_path / "profiles")}


def test_smartmeter_replay_writes_a_kept_journal_into_the_catalog(
    fleet_factory, embedded_catalog, unreachable_sink, cli_env, tmp_path
) -> None:
    data_dir = Path(embedded_catalog.data_directory).parents[1]  # <data-dir>/catalog/hdf5
    assert (data_dir / "catalog" / "catalog.db").exists()
    fleet = fleet_factory(1)
    meter = SmartMeter(*fleet.addresses[0], name="m1",
                       data_directory=embedded_catalog.data_directory, timeout=3.0)
    engine = RunEngine({})
    engine.subscribe(unreachable_sink)
    try:
        (uid,) = engine(plans.synchronized_fly([meter], 0.5))
        received = meter.last_summary.received_samples
    finally:
        meter.destroy()
    assert uid not in embedded_catalog.client
    (journal,) = [p for p in Path(unreachable_sink.session).rglob("*") if uid in p.name]

    # the same run twice (a copy of its journal): written once, then skipped (idempotent)
    copy = tmp_path / "copy" / journal.name  # not where the sink's writer looks for journals
    copy.parent.mkdir()
    copy.write_bytes(journal.read_bytes())
    result = smartmeter("replay", str(journal), str(copy), "--data-dir", str(data_dir),
                        env=cli_env)
    assert result.returncode == 0, result.stderr[-2000:]
    replayed, skipped = result.stdout.splitlines()
    assert f"replayed run {uid}" in replayed and "exit status success" in replayed, replayed
    assert skipped == f"{copy}: run {uid} is already in the catalog; skipped"
    run = embedded_catalog.client[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert read_stream(run, "m1", prefix="m1").sizes["time"] == received == \
        fleet.truth(0).sent_samples > 0


def test_smartmeter_replay_refuses_what_is_not_a_journal_in_one_line(tmp_path, cli_env) -> None:
    not_a_journal = tmp_path / "notes.docs"
    not_a_journal.write_text("a text file, not msgpack records\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, problem in [
        ([str(tmp_path / "gone.docs")], "does not exist"),
        ([str(not_a_journal)], "is not a journal"),
        ([str(empty)], "no journal"),
        ([], "the following arguments are required: JOURNAL"),
    ]:
        result = smartmeter("replay", *args, "--data-dir", str(empty), env=cli_env)
        assert result.returncode == 2, (args, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and problem in line, line
        assert not result.stdout
    assert not list(empty.iterdir())  # nothing touched: no catalog created


def test_smartmeter_replay_has_help() -> None:
    result = smartmeter("replay", "--help", env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-500:]
    assert "JOURNAL" in result.stdout and "--catalog" in result.stdout


def test_smartmeter_replay_says_what_it_could_not_write_and_what_stays_open(
    embedded_catalog, tmp_path, cli_env
) -> None:
    data_dir = Path(embedded_catalog.data_directory).parents[1]
    partly = plain_run(3, stop=True)
    writer = make_tiled_writer(embedded_catalog.client)
    for name, doc in partly[:2]:  # a writer died after the descriptor: the run is open
        writer(name, doc)
    unfinished = plain_run(2, stop=False)  # the acquisition died before its stop document
    a = journal_of(tmp_path / "a.failed", partly)
    b = journal_of(tmp_path / "b.orphaned", unfinished)

    result = smartmeter("replay", str(a), str(b), "--data-dir", str(data_dir), env=cli_env)
    assert result.returncode == 1, result.stderr[-2000:]  # one run could not be written
    (refused,) = result.stderr.splitlines()
    uid_a, uid_b = partly[0][1]["uid"], unfinished[0][1]["uid"]
    assert refused.startswith(f"error: {a}: run {uid_a} not replayed") and \
        "without its stop document" in refused, refused
    (replayed,) = result.stdout.splitlines()
    assert replayed == (f"{b}: replayed run {uid_b} (4 documents, no stop document: the run "
                        "stays open in the catalog)")
    run = embedded_catalog.client[uid_b]
    assert run.metadata.get("stop") is None
    assert list(run["primary"].read()["x"].values) == [0.0, 1.0]
