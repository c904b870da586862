"""Fixtures for the reliability tests (issue 9): the plan fixtures (an emulator fleet on the
real chrony, SmartMeter devices, a RunEngine into the embedded catalog) under a leak check.

``no_leaks`` (autouse) wraps every test and its fixtures: after teardown no thread started
by the test may still run, no TCP/UDP socket opened by it may be open, and no HDF5 file may
be open in this process.  Threads of the test harness itself are not counted: the
RunEngine's loop thread and its executor (bluesky never stops them) and the embedded Tiled
catalog's portal and worker threads (session-long).  The project's own threads are named
(``smartmeter-clients``, ``<meter>-io``, the fleet's loop, ``<meter> sntp``), so they are
always counted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from tests.leak_guard import SETTLE_S, _inet_sockets
from tests.plans.conftest import engine, fleet_factory, smartmeters  # noqa: F401

HARNESS_THREADS = ("bluesky-run-engine", "asyncio-portal", "AnyIO worker thread",
                   "ThreadPoolExecutor-")
HARNESS_TARGETS = ("_connection_worker_thread",)


def _harness(thread: threading.Thread) -> bool:
    return thread.name.startswith(HARNESS_THREADS) or any(
        target in thread.name for target in HARNESS_TARGETS)


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


def leftovers(threads_before: set[threading.Thread], sockets_before: set[str]) -> list[str]:
    problems = []
    threads = [t for t in threading.enumerate()
               if t not in threads_before and t.is_alive() and not _harness(t)]
    if threads:
        problems.append(f"threads left running: {threads}")
    sockets = _inet_sockets() - sockets_before
    if sockets:
        problems.append(f"{len(sockets)} TCP/UDP socket(s) left open")
    if files := open_hdf5_files():
        problems.append(f"HDF5 files left open: {files}")
    return problems


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    before = (set(threading.enumerate()), _inet_sockets())
    yield
    deadline = time.monotonic() + SETTLE_S
    while (problems := leftovers(*before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if problems:
        pytest.fail(f"{request.node.nodeid} leaks: " + "; ".join(problems), pytrace=False)
