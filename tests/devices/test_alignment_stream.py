"""``AlignmentStream`` pages: what the workers have sent, as soon as they send it; nothing
lost when a worker dies (what it did not give is aligned in this process)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from smartmeter_ophyd.devices import AlignmentStream, _alignment
from smartmeter_ophyd.storage import align_recordings
from smartmeter_ophyd.timing import alignment_from_table

from ..storage.test_alignment_worker import assert_same, record
from ..timing._signals import simulate


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("stream")
    meters = [simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=21, duration_s=4.0),
              simulate("a", offset_s=1.1e-3, drift_ppm=15.0, start_rel=0.003, seed=22,
                       duration_s=4.0),
              simulate("b", offset_s=-0.8e-3, drift_ppm=-25.0, start_rel=0.007, seed=23,
                       duration_s=4.0)]
    return {m.name: record(directory / f"{m.name}.h5", m) for m in meters}


def stream_of(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AlignmentStream:
    """A stream over stand-ins for the meters (a name and a finished file each), one worker
    per meter other than the reference."""
    monkeypatch.setattr(_alignment, "METERS_PER_WORKER", 1)
    meters = [SimpleNamespace(name=name, hdf5_path=path) for name, path in files.items()]
    return AlignmentStream(meters)  # type: ignore[arg-type]


def table_of(pages: list[dict]) -> dict[str, list]:
    table: dict[str, list] = {}
    for page in pages:
        for key, values in page["data"].items():
            table.setdefault(key, []).extend(values)
    return table


def test_a_page_comes_as_soon_as_a_worker_answers(files: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 is held (SIGSTOP): worker 0's meter is paged without waiting for it; once
    it runs again its meter follows in a page of its own."""
    stream = stream_of(files, monkeypatch)
    try:
        stream.open()
        assert len(stream._workers) == 2
        held = stream._workers[1].pid
        assert held is not None
        os.kill(held, signal.SIGSTOP)
        try:
            stream.start()
            pages = stream.collect_pages()
            first = next(pages)
        finally:
            os.kill(held, signal.SIGCONT)
        rest = list(pages)
    finally:
        stream.close()
    assert set(first["data"]["alignment_meter"]) == {"a"}
    assert [set(page["data"]["alignment_meter"]) for page in rest] == [{"b"}]
    whole = align_recordings("ref", files)
    for name in ("a", "b"):
        assert_same(alignment_from_table(table_of([first, *rest]), name), whole.results[name])
        assert_same(stream.results[name], whole.results[name])


def test_a_worker_dead_before_its_answer_costs_nothing(
        files: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    stream = stream_of(files, monkeypatch)
    try:
        stream.open()
        stream.start()
        dead = stream._workers[1]
        assert dead.pid is not None
        os.kill(dead.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while dead.running and time.monotonic() < deadline:
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger=_alignment.__name__):
            pages = list(stream.collect_pages())
    finally:
        stream.close()
    meters = [name for page in pages for name in page["data"]["alignment_meter"]]
    assert set(meters) == {"a", "b"} and len(set(table_of(pages)["alignment_meter"])) == 2
    assert any("alignment worker is gone" in r.message and "computed in this process"
               in r.message for r in caplog.records)
    whole = align_recordings("ref", files)
    for name in ("a", "b"):
        result = alignment_from_table(table_of(pages), name)
        np.testing.assert_array_equal(result.offset_s, whole.results[name].offset_s)


def test_abandoning_the_collection_ends_the_workers_and_their_readers(
        files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """What an abort does: the RunEngine drops the collection after a page, the plan closes
    the stream; a worker still busy (held here) is killed and no reader is left behind."""
    stream = stream_of(files, monkeypatch)
    stream.open()
    workers = list(stream._workers)
    held = workers[1].pid
    assert held is not None
    os.kill(held, signal.SIGSTOP)
    stream.start()
    pages = stream.collect_pages()
    next(pages)
    pages.close()
    stream.close()
    deadline = time.monotonic() + 5.0
    while (any(t.name.startswith("alignment-results") for t in threading.enumerate())
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("alignment-results")]
    assert not any(worker.running for worker in workers)
