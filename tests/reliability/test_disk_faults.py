"""Disk faults under a fly (issue 9): the HDF5 disk filling up, the data directory made
read-only or removed while ``plans.synchronized_fly`` records.

The data directory is a small tmpfs mounted inside the embedded catalog's readable storage
(root only; the tests skip with the reason otherwise).  The run must stop the meter, name it
and the file, declare what was not written, close the file and leak nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import pytest

import plans
from smartmeter_ophyd.devices import SmartMeter

from ._support import assert_accounted, assert_idle, when_sampling

FREE_BYTES = 120_000  # less than one ~2 s chunk of 8 kHz samples (~230 kB, see _hdf5)


@contextmanager
def tmpfs(parent: Path, size: str, free: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` under ``parent`` with ``free`` bytes left (all if None); its
    ``data`` directory is where the meter writes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = parent / f"tmpfs-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        if free is not None:
            with open(path / "filler", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(path).free - free))
        (path / "data").mkdir()
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path / "data")], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


@pytest.fixture
def small_disk(embedded_catalog) -> Iterator[Path]:
    """A 2 MB tmpfs in the catalog's readable storage with only FREE_BYTES left."""
    with tmpfs(Path(embedded_catalog.data_directory), "2m", FREE_BYTES) as path:
        yield path


@pytest.fixture
def roomy_disk(embedded_catalog) -> Iterator[Path]:
    """A 64 MB tmpfs in the catalog's readable storage (room for the whole run)."""
    with tmpfs(Path(embedded_catalog.data_directory), "64m") as path:
        yield path


@pytest.fixture
def meter_writing_to(fleet_factory) -> Iterator[Any]:
    """One emulated meter and its SmartMeter writing to a given directory."""
    made: list[SmartMeter] = []

    def make(directory: Path) -> tuple[Any, SmartMeter]:
        fleet = fleet_factory(1)
        meter = SmartMeter(*fleet.addresses[0], name="m1", data_directory=directory,
                           timeout=3.0)
        made.append(meter)
        return fleet, meter

    yield make
    for meter in made:
        meter.destroy()


def hdf5_rows(directory: Path) -> int:
    """Rows of the one HDF5 file in ``directory`` (opening it proves it was closed)."""
    (path,) = directory.glob("*.h5")
    with h5py.File(path, "r") as f:
        return int(f["v_l1"].shape[0])


def fly(engine: Any, meters: list[Any], duration: float) -> tuple[Exception | None, float]:
    started = time.monotonic()
    try:
        engine.RE(plans.synchronized_fly(meters, duration))
        error = None
    except Exception as exc:  # the run failed: its stop document says why
        error = exc
    return error, time.monotonic() - started


def test_disk_full_stops_the_meter_names_it_and_the_file_and_closes_the_file(
    meter_writing_to, engine, small_disk
) -> None:
    fleet, meter = meter_writing_to(small_disk / "data")
    error, took = fly(engine, [meter], 6.0)
    print(repr(error), took, meter.last_summary)
    assert error is not None
    message = str(error)
    assert meter.meter_label in message and "No space left" in message
    assert str(small_disk / "data") in message  # the file's path
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and meter.meter_label in stop["reason"]
    assert_idle(fleet)  # the meter was stopped, not left streaming
    assert took < 6.0 + 10
    # what was received but never reached the disk is declared, and the file closed
    summary = meter.last_summary
    assert summary is not None
    written = hdf5_rows(small_disk / "data")
    lost = summary.received_samples - written
    assert lost > 0
    declared = f"{lost} of {summary.received_samples} received samples were not written"
    assert declared in message and declared in stop["reason"]


def test_a_data_directory_removed_mid_run_fails_it_naming_the_meter_and_the_path(
    meter_writing_to, engine, roomy_disk
) -> None:
    directory = roomy_disk / "data"
    fleet, meter = meter_writing_to(directory)
    thread = when_sampling(engine, lambda: shutil.rmtree(directory), after_s=0.3)
    error, took = fly(engine, [meter], 4.0)
    thread.join(10)
    assert error is not None and meter.meter_label in str(error)
    assert str(directory) in str(error) and "not written" in str(error)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and str(directory) in stop["reason"]
    assert_idle(fleet)
    assert took < 4.0 + 10


def test_a_data_directory_made_read_only_mid_run_keeps_the_open_file_and_loses_nothing(
    meter_writing_to, engine, embedded_catalog, roomy_disk
) -> None:
    directory = roomy_disk / "data"
    fleet, meter = meter_writing_to(directory)

    def read_only() -> None:  # a read-only bind mount over the directory, file open
        subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)

    thread = when_sampling(engine, read_only, after_s=0.3)
    error, _ = fly(engine, [meter], 3.0)
    thread.join(10)
    print(repr(error), engine.docs("stop"))
    assert error is None, error
    (stop,) = engine.docs("stop")
    run = embedded_catalog.client[stop["run_start"]]
    summary = assert_accounted(run, meter, fleet.truth(0).sent_samples)
    assert hdf5_rows(directory) == summary["received_samples"] > 0
    assert_idle(fleet)
