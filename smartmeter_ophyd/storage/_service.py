"""Catalog writing off the acquisition process: a journal, a writer process, a RunEngine sink.

Intent: the RunEngine's process records; it never waits for a catalog while a run goes on,
and no document is lost if the writer dies.

* :class:`JournalSink` - the RunEngine callback (``RE.subscribe(sink)``).  It appends every
  document to its run's journal (:mod:`._journal`) and returns; the journal lives in a
  *session* directory owned by this sink.  It starts the writer process when it is created
  (the writer needs seconds to import Tiled), restarts it when it died, and at each stop document waits (``close_timeout``) until the
  writer has closed the run in the catalog - so when ``RE(plan)`` returns the run reads back
  complete, as with ``TiledWriter``, and the only latency on the acquisition path is the
  stop -> closed time.  If the wait times out, or the writer failed on that run, the error
  is logged (or raised, ``raise_on_failure``) and the journal stays on disk.
* the writer process (``python -m smartmeter_ophyd.storage._writer_main CONFIG``) - tails the
  session's journals and applies them with :class:`~._direct.DirectCatalogWriter` to the
  catalog adapter (no HTTP), updating shapes every ``live_period`` s and whenever the
  journals go quiet (a poll that finds nothing new).  A closed run's
  journal is deleted (or kept with ``keep_journals``).  On start it replays the journals
  left in its session by a writer that died: the partial run is deleted from the catalog
  and rewritten from its journal.  It adopts the sessions of dead acquisition processes
  (neither lock held): their runs are written as far as their journals go and the journals
  are renamed ``*.orphaned``.  When its stdin closes (the sink closed or its process died)
  it finishes what is in the journals and exits.

Locks: the sink holds ``sink.lock`` and the writer ``writer.lock`` in the session directory
(``fcntl.flock``, released by the kernel when a process dies).

``JournalSink.for_server(uri, api_key, journal_root)`` does the same for a Tiled server (the
writer process runs a ``TiledWriter`` over HTTP): what each acquisition host of a fleet uses.
A ``TiledWriter`` holds events and stream data for the stop document, so a run whose stop
never comes (its acquisition process died) is deleted from the server and rewritten from its
journal by :func:`~._journal.replay_into_tiled`, unbatched: every journaled document reaches
the catalog, or the writer log names the run as INCOMPLETE with what is missing.

Memory: the writer keeps nothing per StreamDatum or event, and nothing of a closed run
(``tests/storage/test_writer_memory.py``).  Its RSS still grows during the first hours of
writing into a new embedded catalog: SQLite's page cache (``cache_size`` left at SQLite's
default, 2000 KiB per connection) fills as ``catalog.db`` (aiosqlite) and ``storage.sqlite``
(the ADBC driver's own SQLite) grow past it - native memory in the worker threads' malloc
arenas (anonymous mappings), not seen by tracemalloc.  Bounded: ~2 MB per connection, one of
each in use (3 meters at 8 kHz: +~4 MB, flat after ~1.6 h of data; measured by
``benchmarks/writer_memory.py``).

Limits: one writer per session; several acquisition processes (each its own session) may
share a catalog - SQLite serialises their writers.  Journals record documents, not data:
the samples are in the meters' HDF5 files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ._direct import CatalogWriteError, DirectCatalogWriter
from ._journal import JOURNAL_SUFFIX, JournalReader, JournalWriter, replay_into_tiled

logger = logging.getLogger(__name__)

SINK_LOCK: Final = "sink.lock"
WRITER_LOCK: Final = "writer.lock"
WRITER_READY: Final = "writer.ready"
FAILED_SUFFIX: Final = ".failed"
ERROR_SUFFIX: Final = ".error"
ORPHANED_SUFFIX: Final = ".orphaned"
CLOSED_DIR: Final = "closed"
WRITER_CHECK_S: Final = 1.0
"""How often (at most) the sink checks that its writer process is alive."""
RESTART_BACKOFF_S: Final = 60.0
"""A writer that keeps dying within this time (a server down, a broken catalog) is restarted
after 1, 3, 7, ... s, at most this long apart: importing Tiled costs seconds of CPU."""


@dataclass(frozen=True)
class WriterConfig:
    """What the writer process needs: the catalog (as a Tiled ``catalog`` tree) and a session."""

    uri: str
    writable_storage: tuple[str, ...]
    readable_storage: tuple[str, ...]
    session: str
    journal_root: str
    server_uri: str | None = None
    """Write to this Tiled server over HTTP (a ``TiledWriter``) instead of the catalog
    database; its API key comes from the child's ``TILED_API_KEY``."""
    live_period: float = 1.0
    poll_s: float = 0.1
    keep_journals: bool = False
    sqlite_synchronous: str = "NORMAL"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WriterConfig:
        raw = json.loads(text)
        raw["writable_storage"] = tuple(raw["writable_storage"])
        raw["readable_storage"] = tuple(raw["readable_storage"])
        return cls(**raw)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _held(path: Path) -> bool:
    if not path.exists():
        return False
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


# ---------------------------------------------------------------------- the sink (acquisition)


@dataclass
class _OpenRun:
    journal: JournalWriter
    started: float = field(default_factory=time.monotonic)


class JournalSink:
    """RunEngine callback: journal every document, let a writer process fill the catalog.

    Parameters: ``config`` names the catalog; ``close_timeout`` bounds the wait for the
    writer at each stop document; ``raise_on_failure`` raises :class:`CatalogWriteError`
    from the stop document when the run could not be written (else it is logged).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        journal_root: str | os.PathLike[str],
        *,
        live_period: float = 1.0,
        close_timeout: float = 30.0,
        keep_journals: bool = False,
        raise_on_failure: bool = True,
        writer_log: str | os.PathLike[str] | None = None,
    ) -> None:
        root = Path(journal_root)
        root.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.session = root / name
        self.session.mkdir()
        self._sink_lock = _try_lock(self.session / SINK_LOCK)
        self.config = WriterConfig(
            uri=str(config.get("uri", "")),
            writable_storage=tuple(str(s) for s in config.get("writable_storage", ())),
            readable_storage=tuple(str(s) for s in config.get("readable_storage", ())),
            session=str(self.session),
            journal_root=str(root),
            server_uri=config.get("server_uri"),
            live_period=float(live_period),
            keep_journals=keep_journals,
        )
        self._api_key = config.get("api_key")
        self.close_timeout = float(close_timeout)
        self.raise_on_failure = raise_on_failure
        self.writer_log = Path(writer_log) if writer_log else self.session / "writer.log"
        self._runs: dict[str, _OpenRun] = {}
        self._run_of: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._started = self._next_start = 0.0
        self._failures = 0
        self.restarts = 0
        self.last_close_s: float | None = None
        """Stop document received -> run closed in the catalog, of the last run (s)."""
        self._ensure_writer()  # now: importing Tiled takes seconds, a run should not wait

    @classmethod
    def for_server(
        cls,
        uri: str,
        api_key: str | None,
        journal_root: str | os.PathLike[str],
        **options: Any,
    ) -> JournalSink:
        """A sink whose writer process writes to a Tiled server over HTTP (``TiledWriter``).

        For acquisition hosts of a fleet sharing one server: the RunEngine never waits for
        the server during a run, and a server that is down or slow costs no document (the
        journals stay; a run the server refused is kept as ``*.failed`` for
        :func:`~._journal.replay_journal`).  The key reaches the writer through its
        environment, never its command line.
        """
        if api_key is not None and not api_key.isalnum():
            raise ValueError("Tiled single-user API keys must be alphanumeric")
        return cls({"server_uri": uri, "api_key": api_key}, journal_root, **options)

    # ------------------------------------------------------------------ RunEngine callback

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        uid = self._route(name, doc)
        now = time.monotonic()
        if now - self._checked > WRITER_CHECK_S:
            self._checked = now
            self._ensure_writer()
        run = self._runs.get(uid)
        if run is None:
            if name != "start":
                raise CatalogWriteError(
                    f"{name} document {doc.get('uid', '')!r} of no run this sink has seen "
                    f"(run {uid!r}); subscribe the sink before the run starts"
                )
            self._ensure_writer()
            run = self._runs[uid] = _OpenRun(JournalWriter(self._journal_path(uid)))
        run.journal.append(name, doc)
        if name == "start":
            self._poke()
        elif name == "stop":
            received = time.monotonic()
            self._ensure_writer()
            self._poke()  # first: the writer closes the run while the journal is synced
            run.journal.sync()
            run.journal.close()
            del self._runs[uid]
            self._forget(uid)
            self._wait_closed(uid, received)

    def _route(self, name: str, doc: dict[str, Any]) -> str:
        if name == "start":
            return str(doc["uid"])
        if name in ("descriptor", "resource", "stream_resource"):
            uid = str(doc.get("run_start") or "")
            self._run_of[doc["uid"]] = uid
            return uid
        if name == "stop":
            return str(doc["run_start"])
        key = doc.get("descriptor") or doc.get("resource") or ""
        return self._run_of.get(key, "")

    def _forget(self, uid: str) -> None:
        for key in [k for k, v in self._run_of.items() if v == uid]:
            del self._run_of[key]

    def _journal_path(self, uid: str) -> Path:
        return self.session / f"{uid}{JOURNAL_SUFFIX}"

    # ------------------------------------------------------------------ waiting for closure

    def wait_closed(self, uid: str, timeout: float | None = None) -> bool:
        """True once the writer closed run ``uid`` in the catalog (False on timeout)."""
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        path = self._journal_path(uid)
        failed = path.with_suffix(FAILED_SUFFIX)
        while path.exists():
            if time.monotonic() > deadline:
                return False
            if self._process is not None and self._process.poll() is not None:
                self._ensure_writer()
            time.sleep(0.002)
        if failed.exists():
            error = path.with_suffix(ERROR_SUFFIX)
            text = error.read_text() if error.exists() else "(no error recorded)"
            raise CatalogWriteError(
                f"run {uid} could not be written to the catalog; its documents are kept in "
                f"{failed}: {text.strip().splitlines()[-1] if text.strip() else text}"
            )
        return True

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once the writer process has opened the catalog (it imports Tiled first)."""
        deadline = time.monotonic() + timeout
        marker = self.session / WRITER_READY
        while True:
            self._ensure_writer()  # a dead writer's marker must not count
            process = self._process
            assert process is not None
            if marker.exists() and marker.read_text() == str(process.pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _wait_closed(self, uid: str, received: float) -> None:
        try:
            done = self.wait_closed(uid)
        except CatalogWriteError as exc:
            logger.error("%s", exc)
            if self.raise_on_failure:
                raise
            return
        self.last_close_s = time.monotonic() - received
        if not done:
            logger.error(
                "run %s: the catalog writer did not close it within %.0f s; the documents are "
                "safe in %s and the writer will finish it (see %s)", uid, self.close_timeout,
                self._journal_path(uid), self.writer_log,
            )

    # ------------------------------------------------------------------ the writer process

    @property
    def writer_pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _ensure_writer(self) -> None:
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                return
            now = time.monotonic()
            if process is not None:
                if now < self._next_start:
                    return  # backing off: it died soon after its last start
                lived = now - self._started
                self._failures = self._failures + 1 if lived < RESTART_BACKOFF_S else 0
                self._next_start = now + min(RESTART_BACKOFF_S, 2.0 ** self._failures - 1)
                self.restarts += 1
                if process.stdin is not None:  # the dead writer's pipe
                    with contextlib.suppress(OSError):
                        process.stdin.close()
                logger.warning(
                    "the catalog writer (pid %d) exited with %s after %.0f s; restarting it "
                    "(see %s)", process.pid, process.returncode, lived, self.writer_log,
                )
            self._started = now
            log = open(self.writer_log, "ab")
            env = dict(os.environ)
            if self._api_key:
                env["TILED_API_KEY"] = self._api_key
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "smartmeter_ophyd.storage._writer_main",
                     self.config.to_json()],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env,
                )
            finally:
                log.close()
            assert self._process.stdin is not None
            os.set_blocking(self._process.stdin.fileno(), False)

    def _poke(self) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(process.stdin.fileno(), b"\n")

    def close(self, timeout: float = 60.0) -> None:
        """Let the writer finish what is journaled, then stop it.  Idempotent."""
        for uid, run in list(self._runs.items()):
            logger.warning("closing the sink while run %s is open (no stop document yet)", uid)
            run.journal.sync()
            run.journal.close()
        self._runs.clear()
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("the catalog writer (pid %d) did not finish within %.0f s; "
                             "stopping it (its journals stay in %s)", process.pid, timeout,
                             self.session)
                process.terminate()
                process.wait(10)
        if self._sink_lock is not None:
            os.close(self._sink_lock)
            self._sink_lock = None
        with contextlib.suppress(OSError):
            for lock in (SINK_LOCK, WRITER_LOCK, WRITER_READY):
                (self.session / lock).unlink(missing_ok=True)
            if not any(p for p in self.session.iterdir() if p.name != "writer.log"):
                (self.session / "writer.log").unlink(missing_ok=True)
                self.session.rmdir()

    def __enter__(self) -> JournalSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- the writer process


class _Writer:
    """The writer process's loop (one session, plus adopted orphans)."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.session = Path(config.session)
        self.root: Any = None
        self.writer: DirectCatalogWriter | _HttpWriter | None = None
        self.readers: dict[Path, JournalReader] = {}
        self.uids: dict[Path, str] = {}
        self.closing = asyncio.Event()
        self.wake = asyncio.Event()

    async def open_catalog(self) -> None:
        if self.config.server_uri:
            self.writer = _HttpWriter(self.config.server_uri, os.environ.get("TILED_API_KEY"))
            return
        from sqlalchemy import event
        from tiled.catalog import from_uri

        self.root = from_uri(
            self.config.uri,
            writable_storage=list(self.config.writable_storage),
            readable_storage=list(self.config.readable_storage),
        )
        engine = self.root.context.engine
        if engine.dialect.name == "sqlite":
            mode = self.config.sqlite_synchronous

            def pragmas(conn: Any, _record: Any) -> None:
                cursor = conn.cursor()
                cursor.execute(f"PRAGMA synchronous={mode}")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

            event.listen(engine.sync_engine, "connect", pragmas)
        await self.root.startup()
        await self._warm_up()
        self.writer = DirectCatalogWriter(self.root, live_period=self.config.live_period)

    async def _warm_up(self) -> None:
        """Pay the first-use costs now, not at a run's stop: the first event table otherwise
        costs ~0.5 s of lazy imports (anyio's thread backend, the ADBC driver) and pool setup."""
        import anyio.to_thread
        from tiled.adapters.sql import SQLAdapter  # noqa: F401 - imported for its side effect
        from tiled.storage import SQLStorage

        await anyio.to_thread.run_sync(lambda: None)
        for storage in self.root.context.writable_storage.values():
            if isinstance(storage, SQLStorage):
                connection = storage.connect()
                try:
                    cursor = connection.cursor()
                    cursor.execute("SELECT 1")
                    cursor.fetchall()
                    cursor.close()
                finally:
                    connection.close()

    async def run(self) -> None:
        lock = _try_lock(self.session / WRITER_LOCK)
        if lock is None:
            raise SystemExit(f"another writer holds {self.session / WRITER_LOCK}")
        t0 = time.monotonic()
        await self.open_catalog()
        (self.session / WRITER_READY).write_text(str(os.getpid()))
        logger.info("writer for %s ready in %.2f s", self.session.name, time.monotonic() - t0)
        loop = asyncio.get_running_loop()
        self._watch_stdin(loop)
        await self._recover()
        await self._adopt_orphans()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.poll_s)
            self.wake.clear()
            closing = self.closing.is_set()
            read = await self._pass(self.session)
            assert self.writer is not None
            # Quiet journals: write what is applied now, not at the next live period - the
            # end of a run (its last collects, its summary streams) is then in the catalog
            # when the stop document comes, and the stop has little left to do.
            await self.writer.flush_live(force=not read and self.writer.pending)
            if closing and not read:
                break
        await self._finish_open("the acquisition process closed the session")
        if self.root is not None:
            await self.root.shutdown()
        os.close(lock)

    def _watch_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = sys.stdin.fileno()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(fd)
                self.closing.set()
            self.wake.set()

        loop.add_reader(fd, readable)

    async def _pass(self, directory: Path) -> int:
        """Read and apply every new record of the journals in ``directory``."""
        for path in sorted(directory.glob(f"*{JOURNAL_SUFFIX}")):
            if path not in self.readers:
                self.readers[path] = JournalReader(path)
                self.uids[path] = path.name[: -len(JOURNAL_SUFFIX)]
        total = 0
        for path, reader in list(self.readers.items()):
            if path.parent != directory:
                continue
            records = reader.read()
            total += len(records)
            for name, doc in records:
                started = time.monotonic()
                try:
                    closed = await self._apply(name, doc)
                except Exception as exc:
                    self._fail(path, exc)
                    break
                if closed:
                    logger.info("run %s closed: %d documents; the stop took %.3f s, the "
                                "pass %d records", self.uids.get(path), reader.records,
                                time.monotonic() - started, len(records))
                    self._closed(path)
                    break
        return total

    async def _apply(self, name: str, doc: dict[str, Any]) -> bool:
        assert self.writer is not None
        return await self.writer.process(name, doc) is not None

    def _closed(self, path: Path) -> None:
        reader = self.readers.pop(path)
        reader.close()
        self.uids.pop(path, None)
        if self.config.keep_journals:
            target = path.parent / CLOSED_DIR
            target.mkdir(exist_ok=True)
            path.rename(target / path.name)
        else:
            path.unlink()

    def _fail(self, path: Path, exc: BaseException) -> None:
        uid = self.uids.get(path, path.stem)
        logger.error("run %s: cannot write it to the catalog: %s", uid, exc)
        # The error first: the sink looks for it once the journal has become *.failed.
        path.with_suffix(ERROR_SUFFIX).write_text("".join(traceback.format_exception(exc)))
        reader = self.readers.pop(path)
        reader.close()
        os.replace(path, path.with_suffix(FAILED_SUFFIX))
        if self.writer is not None:
            self.writer.abandon(uid)

    async def _recover(self) -> None:
        """Journals left by a writer that died: delete the partial runs, replay from 0."""
        assert self.writer is not None
        for path in sorted(self.session.glob(f"*{JOURNAL_SUFFIX}")):
            uid = path.name[: -len(JOURNAL_SUFFIX)]
            if await self.writer.delete_run(uid):
                logger.warning("run %s: replaying it from %s after a writer restart", uid, path)

    async def _adopt_orphans(self) -> None:
        """Sessions whose acquisition process and writer both died: write what they hold."""
        root = Path(self.config.journal_root)
        for session in sorted(p for p in root.iterdir() if p.is_dir() and p != self.session):
            if _held(session / SINK_LOCK):
                continue
            lock = _try_lock(session / WRITER_LOCK)
            if lock is None:
                continue
            try:
                journals = sorted(session.glob(f"*{JOURNAL_SUFFIX}"))
                if not journals:
                    continue
                logger.warning("adopting %d journal(s) of the dead session %s",
                               len(journals), session)
                assert self.writer is not None
                for path in journals:
                    await self.writer.delete_run(path.name[: -len(JOURNAL_SUFFIX)])
                await self._pass(session)
                await self._finish_open(f"its acquisition process ({session.name}) died",
                                        directory=session)
            finally:
                os.close(lock)
                with contextlib.suppress(OSError):
                    (session / WRITER_LOCK).unlink()
                    session.rmdir()  # only if nothing (no orphaned journal) is left

    async def _finish_open(self, why: str, directory: Path | None = None) -> None:
        """Runs whose stop never came: write what they have, keep their journals."""
        assert self.writer is not None
        await self.writer.flush_live(force=True)
        for path, reader in list(self.readers.items()):
            if directory is not None and path.parent != directory:
                continue
            reader.close()
            del self.readers[path]
            uid = self.uids.pop(path, path.stem)
            self.writer.abandon(uid)
            orphaned = path.with_suffix(ORPHANED_SUFFIX)
            if isinstance(self.writer, _HttpWriter):
                # before the rename: a writer dying here leaves a journal the next one replays
                await self.writer.rewrite_unfinished(uid, path, orphaned, reader.records)
            logger.warning("run %s has no stop document (%s); written as far as %s goes",
                           uid, why, path)
            os.replace(path, orphaned)


class _HttpWriter:
    """The writer process's engine for a Tiled server: a ``TiledWriter`` in a worker thread
    (its HTTP calls block), with the direct writer's interface."""

    def __init__(self, uri: str, api_key: str | None) -> None:
        from ._catalog import connect_server
        from ._consolidator import make_tiled_writer

        self.client = connect_server(uri, api_key)
        self.tiled = make_tiled_writer(self.client)
        self._open: set[str] = set()

    @property
    def open_runs(self) -> tuple[str, ...]:
        return tuple(self._open)

    async def process(self, name: str, doc: dict[str, Any]) -> str | None:
        await asyncio.to_thread(self.tiled, name, doc)
        if name == "start":
            self._open.add(doc["uid"])
        elif name == "stop":
            self._open.discard(doc["run_start"])
            return str(doc["run_start"])
        return None

    @property
    def pending(self) -> bool:
        """Never: ``TiledWriter`` writes as documents come (its own batching)."""
        return False

    async def flush_live(self, force: bool = False) -> None:
        """Nothing: ``TiledWriter`` writes as documents come (its own batching)."""

    def abandon(self, uid: str) -> None:
        self._open.discard(uid)

    async def rewrite_unfinished(
        self, uid: str, journal: Path, kept_as: Path, documents: int
    ) -> bool:
        """Rewrite an abandoned run (no stop document will come) whole from its journal.

        ``TiledWriter`` holds a run's events, and its StreamDatums until they span a batch,
        for the stop document: abandoned, they would never reach the server although the
        journal holds them.  So the partial run is deleted and written again by
        :func:`~._journal.replay_into_tiled`, which writes a stop-less journal unbatched.
        False (and an error in the log naming the run, what is missing and ``kept_as``, where
        the journal will be) if the server refused the rewrite: the run is then incomplete.
        """
        try:
            await self.delete_run(uid)
            report = await asyncio.to_thread(replay_into_tiled, journal, self.client)
        except Exception as exc:  # the server down, a refused delete: the journal stays
            logger.error("run %s is INCOMPLETE in the catalog: rewriting it from its journal "
                         "failed (%s: %s); its events and stream data after the last batch "
                         "written are missing. All %d documents are in %s: remove the run "
                         "and replay it (smartmeter replay)", uid, type(exc).__name__, exc,
                         documents, kept_as)
            return False
        if not report.ok:
            logger.error("run %s is INCOMPLETE in the catalog: %d of its %d documents written; "
                         "%s. All are in %s: remove the run and replay it (smartmeter replay)",
                         uid, report.documents, documents, report.error, kept_as)
            return False
        logger.info("run %s rewritten from its journal without batching: %d documents",
                    uid, report.documents)
        return True

    async def delete_run(self, uid: str) -> bool:
        def delete() -> bool:
            if uid not in self.client:
                return False
            self.client.delete_contents([uid], recursive=True, external_only=False)
            return True

        return await asyncio.to_thread(delete)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="smartmeter-ophyd catalog writer process")
    parser.add_argument("config", help="WriterConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the acquisition shell: finish
    config = WriterConfig.from_json(args.config)
    asyncio.run(_Writer(config).run())
    return 0
