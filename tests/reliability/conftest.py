"""Fixtures for the reliability tests (issue 9): the plan fixtures (an emulator fleet on the
real chrony, SmartMeter devices, a RunEngine into the embedded catalog).

Threads, tasks and sockets are checked for every test by the project-wide leak guard
(tests/leak_guard.py).  ``no_open_hdf5`` (autouse) adds what matters here: once a test and
its fixtures are done, no HDF5 file may still be open in this process (a fly that failed
half-way must still close its file).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.leak_guard import SETTLE_S
from tests.plans.conftest import engine, fleet_factory, smartmeters  # noqa: F401


def open_hdf5_files() -> list[str]:
    """Paths of HDF5 files this process holds open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith((".h5", ".hdf5")):
            paths.append(target)
    return paths


@pytest.fixture(autouse=True)
def no_open_hdf5(request: pytest.FixtureRequest) -> Iterator[None]:
    before = set(open_hdf5_files())
    yield
    deadline = time.monotonic() + SETTLE_S
    while (files := sorted(set(open_hdf5_files()) - before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if files:
        pytest.fail(f"{request.node.nodeid} leaves HDF5 files open: {files}", pytrace=False)
