"""``align_recordings`` and its worker process, on HDF5 files of simulated meters whose true
offsets are known (the grid model's ground truth, as in ``tests/timing``)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from smartmeter_ophyd.storage import (
    AlignmentSession,
    AlignmentWorker,
    AlignmentWorkerError,
    RecordedAlignment,
    align_recordings,
    read_waveform,
)
from smartmeter_ophyd.timing import Alignment, align

from ..timing._signals import T0, SimMeter, simulate, true_offset

TRUTH_LIMIT_S = 10e-6


def record(path: Path, meter: SimMeter, *, with_voltage: bool = True) -> str:
    """The meter as the writer stores it: float64 ``/time``, float32 channels, Blosc2."""
    blosc = hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE)
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("time", data=meter.time, chunks=(8192,), **blosc)
        if with_voltage:
            f.create_dataset("v_l1", data=meter.voltage.astype(np.float32), chunks=(8192,),
                             **blosc)
        else:
            f.create_dataset("i_l1", data=meter.voltage.astype(np.float32), chunks=(8192,))
    return str(path)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, SimMeter],
                                                                  dict[str, str]]:
    directory = tmp_path_factory.mktemp("recordings")
    meters = {
        "ref": simulate("ref", offset_s=0.0, drift_ppm=0.0, seed=11, duration_s=6.0),
        "early": simulate("early", offset_s=-1.3e-3, drift_ppm=20.0, start_rel=0.004,
                          seed=12, duration_s=6.0),
        "late": simulate("late", offset_s=2.1e-3, drift_ppm=-30.0, start_rel=0.011, seed=13,
                         duration_s=6.0),
    }
    files = {name: record(directory / f"{name}.h5", m) for name, m in meters.items()}
    return meters, files


def test_the_worker_finds_the_true_offsets_and_agrees_with_this_process(
    recordings: tuple[dict[str, SimMeter], dict[str, str]],
) -> None:
    meters, files = recordings
    with AlignmentWorker() as worker:
        worker.submit("ref", files)
        found = worker.result()
    here = align_recordings("ref", files)
    assert found.reference == "ref" and set(found.results) == {"early", "late"}
    for name, result in found.results.items():
        np.testing.assert_array_equal(result.offset_s, here.results[name].offset_s)
        mid = 0.5 * (result.window_start + result.window_end) - T0
        truth = np.interp(mid, meters[name].rel_time, true_offset(meters[name], meters["ref"]))
        assert len(result) >= 5
        assert np.max(np.abs(result.offset_s - truth)) < TRUTH_LIMIT_S, name


def assert_same(found: Alignment, expected: Alignment) -> None:
    for name in ("window_start", "window_end", "offset_s", "drift", "uncertainty_s",
                 "correlation", "n_samples"):
        np.testing.assert_array_equal(getattr(found, name), getattr(expected, name), name)


def test_files_handed_over_as_they_close_give_what_aligning_all_at_once_gives(
    recordings: tuple[dict[str, SimMeter], dict[str, str]], tmp_path: Path,
) -> None:
    """The worker aligns each file against the reference's span widened by 2 s; a meter
    reaching past it (``long``: 4 s more) is aligned at finish over the exact span."""
    meters, files = recordings
    longer = simulate("long", offset_s=0.7e-3, drift_ppm=10.0, start_rel=0.002, seed=14,
                      duration_s=10.0)
    files = {**files, "long": record(tmp_path / "long.h5", longer)}
    expected = align([w for name, path in files.items()
                      if (w := read_waveform(name, path)) is not None], "ref")
    with AlignmentWorker() as worker:
        worker.begin("ref")
        worker.add("late", files["late"])  # before the reference: waits for it
        worker.add("ref", files["ref"])
        worker.add("long", files["long"])
        worker.finish(files)  # "early" was never added: added now
        found = worker.result()
    assert set(found.results) == {"early", "late", "long"}
    for name, result in found.results.items():
        assert_same(result, expected[name])
    session = AlignmentSession("ref")
    session.add("early", files["early"])
    session.add("ref", files["ref"])
    assert_same(session.finish(files).results["early"], expected["early"])


def test_parts_come_as_the_worker_finds_them_each_result_once(
    recordings: tuple[dict[str, SimMeter], dict[str, str]], tmp_path: Path,
) -> None:
    """What was aligned before ``finish`` comes first; the rest follows meter by meter;
    merged, the parts are the whole answer, each result and note once."""
    meters, files = recordings
    files = {**files, "current": record(tmp_path / "current.h5", meters["late"],
                                        with_voltage=False)}
    with AlignmentWorker() as worker:
        worker.begin("ref")
        worker.add("ref", files["ref"])
        worker.add("early", files["early"])
        worker.finish(files)
        parts = list(worker.parts())
    assert list(parts[0].results) == ["early"]
    assert [name for part in parts for name in part.results] == ["early", "late"]
    notes = [note for part in parts for note in part.notes]
    assert notes == [(logging.INFO, "alignment: current has no v_l1 samples; left out")]
    whole = align_recordings("ref", files)
    merged = RecordedAlignment.merged("ref", parts)
    assert merged.notes == whole.notes
    for name in ("early", "late"):
        assert_same(merged.results[name], whole.results[name])


def test_shares_of_the_meters_merge_into_one_answer(
    recordings: tuple[dict[str, SimMeter], dict[str, str]], tmp_path: Path,
) -> None:
    meters, files = recordings
    files = {**files, "current": record(tmp_path / "current.h5", meters["late"],
                                        with_voltage=False)}
    parts = [align_recordings("ref", {"ref": files["ref"], "early": files["early"]}),
             align_recordings("ref", {"ref": files["ref"], "current": files["current"]}),
             align_recordings("ref", {"ref": files["ref"], "late": files["late"]})]
    merged = RecordedAlignment.merged("ref", parts)
    whole = align_recordings("ref", files)
    assert set(merged.results) == set(whole.results) == {"early", "late"}
    assert merged.notes == whole.notes == (
        (logging.INFO, "alignment: current has no v_l1 samples; left out"),)
    nothing = RecordedAlignment.merged("ref", parts[1:2] * 2)
    assert nothing.results == {} and nothing.notes == (
        (logging.INFO, "alignment: current has no v_l1 samples; left out"),
        (logging.INFO, "alignment: fewer than two meters with v_l1; nothing to align"))


def test_a_meter_without_v_l1_is_left_out_with_a_note(
    recordings: tuple[dict[str, SimMeter], dict[str, str]], tmp_path: Path,
) -> None:
    meters, files = recordings
    current_only = record(tmp_path / "current.h5", meters["late"], with_voltage=False)
    with AlignmentWorker() as worker:
        worker.submit("ref", {**files, "current": current_only})
        found = worker.result()
    assert set(found.results) == {"early", "late"}
    assert (logging.INFO, "alignment: current has no v_l1 samples; left out") in found.notes


def test_a_missing_reference_aligns_nothing_and_says_why(tmp_path: Path) -> None:
    found = align_recordings("gone", {"gone": str(tmp_path / "absent.h5")})
    assert found.results == {}
    assert any(level == logging.WARNING and note.startswith("alignment: reference gone: ")
               and note.endswith("; nothing aligned") for level, note in found.notes)


def test_close_ends_a_busy_worker_at_once(
    recordings: tuple[dict[str, SimMeter], dict[str, str]],
) -> None:
    _, files = recordings
    worker = AlignmentWorker()
    worker.start()
    worker.submit("ref", files)
    begun = time.monotonic()
    worker.close()
    assert time.monotonic() - begun < 2.0
    assert not worker.running


def test_a_ctrl_c_at_the_terminal_leaves_the_worker_to_its_caller(
    recordings: tuple[dict[str, SimMeter], dict[str, str]],
) -> None:
    """A terminal's Ctrl-C signals its foreground process group; the worker is not in the
    caller's, so the caller (aborting its run) decides when the worker ends."""
    _, files = recordings
    worker = AlignmentWorker()
    worker.start()
    try:
        assert worker.pid is not None
        assert os.getpgid(worker.pid) != os.getpgid(0)
        worker.submit("ref", files)
        assert set(worker.result().results) == {"early", "late"}
    finally:
        worker.close()
    assert not worker.running


def test_a_dead_worker_is_reported_not_awaited(
    recordings: tuple[dict[str, SimMeter], dict[str, str]],
) -> None:
    _, files = recordings
    worker = AlignmentWorker()
    worker.start()
    try:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while worker.running and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(AlignmentWorkerError, match="gone: exited with -9"):
            worker.submit("ref", files)
            worker.result()
    finally:
        worker.close()


def worker_environment(worker: AlignmentWorker) -> dict[str, str]:
    """The worker's environment as its process sees it (read again while the kernel still
    sets up the new image: ``Popen`` may return in that window, with nothing to read)."""
    assert worker.pid is not None
    deadline = time.monotonic() + 5.0
    while not (raw := Path(f"/proc/{worker.pid}/environ").read_bytes()):
        assert time.monotonic() < deadline, "the worker's environment never appeared"
        time.sleep(0.005)
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_worker_keeps_its_temporaries_on_the_heap_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's glibc settings (``WORKER_MALLOC``): not the acquisition process's
    128 KiB mmap threshold, which maps every numpy temporary afresh; the caller's own wins."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with AlignmentWorker() as worker:
        env = worker_environment(worker)
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 32 << 20
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 64 << 20
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "262144")
    with AlignmentWorker() as worker:
        assert worker_environment(worker)["MALLOC_MMAP_THRESHOLD_"] == "262144"
