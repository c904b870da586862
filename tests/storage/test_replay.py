"""A kept journal written into a real (embedded) Tiled catalog by ``replay_into_tiled``.

* a journal without a stop document (its process died) reads back every event and every
  sample: a ``TiledWriter`` fed the same journal with its default batching
  (``replay_journal(path, make_tiled_writer(client))``) writes none of its events;
* a journal whose descriptor the catalog's writer refuses is reported with that document,
  its number and the writer's reason, and the run stays as far as it was written;
* a run already in the catalog is skipped; one there without its stop while the journal has
  one is reported, not written twice;
* a file that is not a journal is refused naming it.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import (
    JournalWriter,
    ReplayReport,
    make_tiled_writer,
    read_gaps,
    read_run_journal,
    read_stream,
    replay_into_tiled,
    replay_journal,
)

from .test_run_roundtrip import FRAME, LOST, RATE, START_TS, TestMeter, expected_data
from .test_sink import _journal_a_run


def journal_of(path: Path, docs: list[tuple[str, dict[str, Any]]]) -> Path:
    with JournalWriter(path) as journal:
        for name, doc in docs:
            journal.append(name, doc)
    return path


def plain_run(n_events: int, *, stop: bool,
              data_keys: tuple[str, ...] = ("x",)) -> list[tuple[str, dict[str, Any]]]:
    """start, one descriptor, ``n_events`` events of ``x = i`` and a stop if asked."""
    start = {"uid": str(uuid.uuid4()), "time": time.time(), "scan_id": 1}
    descriptor = {"uid": str(uuid.uuid4()), "run_start": start["uid"], "time": time.time(),
                  "name": "primary",
                  "data_keys": {k: {"source": "test", "dtype": "number", "shape": []}
                                for k in data_keys},
                  "object_keys": {}, "configuration": {}, "hints": {}}
    docs: list[tuple[str, dict[str, Any]]] = [("start", start), ("descriptor", descriptor)]
    docs += [("event", {"uid": str(uuid.uuid4()), "descriptor": descriptor["uid"],
                        "time": time.time(), "seq_num": i + 1,
                        "data": {k: float(i) for k in data_keys},
                        "timestamps": {k: time.time() for k in data_keys}, "filled": {}})
             for i in range(n_events)]
    if stop:
        docs.append(("stop", {"uid": str(uuid.uuid4()), "run_start": start["uid"],
                              "time": time.time(), "exit_status": "success", "reason": "",
                              "num_events": {"primary": n_events}}))
    return docs


def events_in_catalog(client: Any, uid: str) -> list[float]:
    stream = client[uid]["primary"]
    if "x" not in stream:  # the descriptor's node, but no table was ever written
        return []
    return [float(v) for v in stream.read()["x"].values]


def test_a_stop_less_journal_reads_back_every_event(embedded_catalog, tmp_path) -> None:
    client = embedded_catalog.client
    n = 7
    # the generic path, as the library offered it: the events wait for a stop in the batch
    old = journal_of(tmp_path / "old.orphaned", plain_run(n, stop=False))
    assert replay_journal(old, make_tiled_writer(client)) == 2 + n
    assert events_in_catalog(client, read_run_journal(old)[0][1]["uid"]) == []

    docs = plain_run(n, stop=False)
    path = journal_of(tmp_path / "new.orphaned", docs)
    report = replay_into_tiled(path, client)
    uid = docs[0][1]["uid"]
    assert report == ReplayReport(str(path), uid, "replayed", 2 + n, None)
    assert report.ok
    assert events_in_catalog(client, uid) == [float(i) for i in range(n)]
    assert client[uid].metadata.get("stop") is None  # the run stays open
    assert report.describe() == (f"{path}: replayed run {uid} ({2 + n} documents, no stop "
                                 "document: the run stays open in the catalog)")
    again = replay_into_tiled(path, client)
    assert again.outcome == "already in the catalog" and again.documents == 0
    assert events_in_catalog(client, uid) == [float(i) for i in range(n)]


def test_a_stop_less_journal_of_streamed_samples_reads_back_every_sample(
    embedded_catalog, tmp_path
) -> None:
    """A flyer's run (StreamResource/StreamDatum into HDF5, with a packet gap) journaled by a
    process that died before its stop: every sample and the gap read back, bit for bit."""
    meter = TestMeter(name="rpl", directory=embedded_catalog.data_directory, seed=31)
    uid = _journal_a_run(tmp_path / "run.docs", meter, keep_stop=False)
    path = tmp_path / f"{uid}.docs"
    names = [name for name, _ in read_run_journal(path)]
    assert "stop" not in names and names.count("stream_datum") > 2

    report = replay_into_tiled(path, embedded_catalog.client)
    assert report.outcome == "replayed" and report.documents == len(names), report
    assert report.exit_status is None
    run = embedded_catalog.client[uid]
    assert run.metadata.get("stop") is None
    values, positions, gap_index = expected_data(meter.seed)
    samples = read_stream(run, "meter")
    got = np.stack([samples[f"{meter.name}_{ch}"].values for ch in Measures.VI.channels], axis=1)
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))  # every sample, bit for bit
    np.testing.assert_allclose(samples["time"].values, START_TS + positions / RATE,
                               rtol=0, atol=1e-6)
    gaps = read_gaps(run, "meter_gaps")
    assert gaps["sample_index"].tolist() == [gap_index]
    assert gaps["missing_samples"].tolist() == [len(LOST) * FRAME]


def test_a_refused_document_is_reported_with_its_number_and_reason(
    embedded_catalog, tmp_path
) -> None:
    # "time" is renamed "time_" by the writer (a reserved word), which then collides
    docs = plain_run(3, stop=True, data_keys=("time", "time_"))
    path = journal_of(tmp_path / "refused.failed", docs)
    uid = docs[0][1]["uid"]
    report = replay_into_tiled(path, embedded_catalog.client)
    assert not report.ok
    assert (report.outcome, report.documents, report.refused_document, report.exit_status) == \
        ("failed", 1, "descriptor", "success")
    assert report.error is not None
    assert report.error.startswith("the catalog refused its descriptor document (#2): "
                                   "ValueError: Cannot rename time to time_"), report.error
    assert report.describe() == f"{path}: run {uid} not replayed: {report.error}"
    # the start was written: the run is there, without its stop; a second replay says so
    assert embedded_catalog.client[uid].metadata.get("stop") is None
    again = replay_into_tiled(path, embedded_catalog.client)
    assert again.outcome == "failed" and again.documents == 0 and again.refused_document is None
    assert again.error is not None and "without its stop document" in again.error


def test_a_finished_journal_is_written_whole_and_once(embedded_catalog, tmp_path) -> None:
    docs = plain_run(4, stop=True)
    path = journal_of(tmp_path / "finished.docs", docs)
    uid = docs[0][1]["uid"]
    report = replay_into_tiled(path, embedded_catalog.client)
    assert (report.outcome, report.documents, report.exit_status) == ("replayed", 7, "success")
    assert events_in_catalog(embedded_catalog.client, uid) == [0.0, 1.0, 2.0, 3.0]
    assert embedded_catalog.client[uid].metadata["stop"]["exit_status"] == "success"
    again = replay_into_tiled(path, embedded_catalog.client)
    assert again.outcome == "already in the catalog" and again.ok
    assert again.describe() == f"{path}: run {uid} is already in the catalog; skipped"


def test_what_is_not_a_journal_is_refused_naming_the_file(embedded_catalog, tmp_path) -> None:
    text = tmp_path / "notes.docs"
    text.write_text("a text file, not msgpack records\n")
    headless = journal_of(tmp_path / "headless.docs", plain_run(2, stop=True)[1:])
    empty = tmp_path / "empty.docs"
    empty.write_bytes(b"")
    for path, problem in [(text, "is not a journal"),
                          (headless, "begins with a 'descriptor' document"),
                          (empty, "holds no complete document")]:
        with pytest.raises(ValueError, match=problem) as info:
            replay_into_tiled(path, embedded_catalog.client)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        replay_into_tiled(tmp_path / "gone.docs", embedded_catalog.client)
