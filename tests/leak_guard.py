"""A pytest plugin: fail a test that leaves threads, asyncio tasks or network sockets behind.

``tests/conftest.py`` registers it for the whole suite (``pytest_plugins``).  Its autouse
fixture wraps every test *and its fixtures*: it is set up first and torn down last, so a
fixture that closes its clients, emulators and servers leaves nothing and passes.  Only
what appeared during the test counts: a thread or socket that an earlier test left ending
is in the "before" snapshot and is not blamed on this one.  What it checks after teardown:

* threads -- every thread started during the test has ended (the shared client loop thread
  ends with the last ``MeterClient``; a fixture that closes its clients leaves none).
  Pool threads that a long-lived event loop starts on demand (``POOL_THREADS``: AnyIO's
  worker threads, aiosqlite's connection threads, both under the session's embedded Tiled
  catalog) are not counted: they end with their loop, and a leaked loop is caught by its
  own thread (a Tiled client's ``asyncio-portal-*``);
* tasks -- (async tests) no task of the test's event loop is still pending once the test's
  fixtures are torn down; leaked tasks are cancelled, then the test fails;
* sockets -- no TCP or UDP socket opened during the test is still open (Unix socket pairs,
  such as an event loop's self-pipe, are not counted);
* child processes -- none started during the test still runs (an alignment worker, an
  emulator or CLI subprocess must be ended by whoever started it).  A catalog's writer
  process (``SHARED_CHILDREN``) is not counted: it starts with the first run written to the
  catalog, often a module's or the session's fixture, and ends with that catalog.

Closing is often asynchronous (a transport closes on the next loop pass, a joined thread
takes a moment), so each check waits up to ``SETTLE_S`` before it fails.

Limits: Linux only for sockets and processes (``/proc``); elsewhere only threads and tasks
are checked.
A TCP socket that was only created or bound (never listening nor connected) is not in
``/proc/net/tcp`` and is not seen; garbage-collected unclosed, it still fails the test then
through its ``ResourceWarning`` (warnings are errors).
A test marked ``@pytest.mark.leaks_allowed("why")`` is not checked.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

SETTLE_S = 5.0
POOL_THREADS = ("AnyIO worker thread", "(_connection_worker_thread)")
SHARED_CHILDREN = ("smartmeter_ophyd.storage._writer_main",)
_BEFORE = pytest.StashKey[tuple[set[threading.Thread], set[str], set[int]]]()
_PROC_NET = ("tcp", "tcp6", "udp", "udp6")


def _inet_sockets() -> set[str]:
    """Inodes of this process's open TCP/UDP sockets (empty where /proc is missing)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    mine = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    inet = set()
    for table in _PROC_NET:
        try:
            lines = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in mine:
                inet.add(fields[9])
    return inet


def _children() -> set[int]:
    """This process's running (not zombie) children (empty where /proc is missing)."""
    me = os.getpid()
    children = set()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return children
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z" and not any(
                name in _command(pid) for name in SHARED_CHILDREN):
            children.add(pid)
    return children


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: " + raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def _pool_thread(thread: threading.Thread) -> bool:
    return any(name in thread.name for name in POOL_THREADS)


def _leftovers(threads_before: set[threading.Thread], sockets_before: set[str],
               children_before: set[int]) -> list[str]:
    problems = []
    threads = [
        t for t in threading.enumerate()
        if t not in threads_before and t.is_alive() and not _pool_thread(t)
    ]
    if threads:
        problems.append(f"threads left running: {threads}")
    sockets = _inet_sockets() - sockets_before
    if sockets:
        problems.append(f"{len(sockets)} TCP/UDP socket(s) left open")
    children = _children() - children_before
    if children:
        problems.append("child processes left running: "
                        + "; ".join(_command(pid) for pid in sorted(children)))
    return problems


def _fail(nodeid: str, problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{nodeid} leaks: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def leak_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("leaks_allowed") is not None:
        yield
        return
    before = (set(threading.enumerate()), _inet_sockets(), _children())
    function = getattr(request.node, "obj", None)
    if inspect.iscoroutinefunction(function) or request.node.get_closest_marker("asyncio"):
        # async test: the event-loop side checks after the loop's fixtures are torn down
        request.node.stash[_BEFORE] = before
        request.getfixturevalue("_leak_guard_tasks")
        yield
        return
    yield
    deadline = time.monotonic() + SETTLE_S
    while (problems := _leftovers(*before)) and time.monotonic() < deadline:
        time.sleep(0.02)
    _fail(request.node.nodeid, problems)


@pytest.fixture
async def _leak_guard_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    deadline = time.monotonic() + SETTLE_S
    while True:
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    # The loop's own executor threads (getaddrinfo) belong to the loop, which closes next.
    await asyncio.get_running_loop().shutdown_default_executor()
    if pending:
        names = ", ".join(sorted(t.get_name() for t in pending))
        pytest.fail(f"{request.node.nodeid} leaks asyncio tasks: {names}", pytrace=False)
    before = request.node.stash[_BEFORE]
    deadline = time.monotonic() + SETTLE_S
    while (problems := _leftovers(*before)) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # transports close on a later pass of this loop
    _fail(request.node.nodeid, problems)
