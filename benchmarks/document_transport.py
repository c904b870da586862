"""The issue's ways of taking document writing out of the acquisition process, side by side.

The same fly - N emulated meters (child processes, 8 kHz x 6 channels, synced by the real
chrony), one ``plans.synchronized_fly`` of ``--seconds`` starting at kickoff - is recorded
into one embedded catalog by each of:

* ``in-process``: ``TiledWriter`` over the in-process Tiled app, in the acquisition process:
  where this project started, the baseline;
* ``server``: the same catalog served by its own ``tiled serve catalog`` process, the
  ``TiledWriter`` here posting to it over HTTP (the issue's first option);
* ``0mq``: bluesky's ``Publisher`` here, a ``Proxy`` process, and a ``RemoteDispatcher``
  process running the ``TiledWriter`` over its own in-process app (the issue's existing
  transport);
* ``sink``: ``catalog.document_sink()``, the default: a journal here, a writer process that
  applies the documents in batches straight to the catalog.

Per way: the RunEngine's wall time, this process's CPU, stop document -> run closed in the
catalog (for ``0mq``, the dispatcher's clock once its ``TiledWriter`` took the stop: the same
host clock), and what a fresh client reads the moment ``RE`` returns: is the stop document
there, and are the meters' samples (each meter's ``time`` column against what it received).

``--kill``: each way again, its writing process killed (SIGKILL) half-way through the data
and started again at once: the Tiled server, the dispatcher (the proxy stays), the sink's
writer (the sink restarts it itself).  The in-process writer has no process of its own.
Printed: how the run ended and what of it the catalog holds once the writing is over.

Last line: ``stop to run closed, N meters: sink X s, server Y s, 0mq Z s, in-process W s``.

Usage: ``python benchmarks/document_transport.py --meters 10 --seconds 4 [--kill]``
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _harness import (
    Emulators,
    Marks,
    StopTimed,
    cpu_seconds,
    destroyed,
    host_load,
    smartmeters,
)
from bluesky import RunEngine

import plans
from smartmeter_ophyd.storage import (
    close_client,
    connect_server,
    make_tiled_writer,
    setup_embedded_catalog,
)

WAYS = ("in-process", "server", "0mq", "sink")
PROFILE = "smartmeter-transport"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TiledServer:
    """``tiled serve catalog`` over the embedded catalog's database and storage."""

    def __init__(self, catalog: Any, log: Path) -> None:
        self.catalog = catalog
        self.log = log
        self.port = free_port()
        self.api_key = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 60.0) -> None:
        storage = [a for w in self.catalog.writable_storage for a in ("-w", w)]
        readable = [a for r in self.catalog.readable_storage for a in ("-r", str(r))]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "tiled"), "serve", "catalog",
                 self.catalog.catalog_uri, *storage, *readable, "--api-key", self.api_key,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tiled serve exited ({self.process.returncode}), see {self.log}")
            try:  # the port first: Tiled's client would retry (and say so) on a refusal
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                close_client(connect_server(self.uri, self.api_key))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


def _proxy_main(in_port: int, out_port: int) -> None:
    from bluesky.callbacks.zmq import Proxy

    Proxy(f"127.0.0.1:{in_port}", f"127.0.0.1:{out_port}").start()


def _dispatcher_main(out_port: int, directory: str, profiles_dir: str, reports: Any) -> None:
    """A ``RemoteDispatcher`` running a ``TiledWriter`` over its own in-process app.

    Reports ``("handshake", token)`` for the parent's subscription check (a ``start``
    document carrying ``handshake``, never given to the writer) and, at each stop document,
    ``("stop", run uid, wall time, documents written, documents refused, first refusal)``.
    """
    from bluesky.callbacks.zmq import RemoteDispatcher

    logging.basicConfig(level=logging.ERROR)
    catalog = setup_embedded_catalog(directory, PROFILE, profiles_dir=profiles_dir)
    writer = make_tiled_writer(catalog.client)
    counts = {"written": 0, "refused": 0}
    refusal: list[str] = []

    def on_document(name: str, doc: dict[str, Any]) -> None:
        if name == "start" and "handshake" in doc:
            reports.put(("handshake", doc["handshake"]))
            return
        try:
            writer(name, doc)
            counts["written"] += 1
        except Exception as exc:
            counts["refused"] += 1
            refusal.append(f"{type(exc).__name__}: {exc}"[:120])
        if name == "stop":
            reports.put(("stop", doc["run_start"], time.time(), counts["written"],
                         counts["refused"], refusal[0] if refusal else ""))

    dispatcher = RemoteDispatcher(f"127.0.0.1:{out_port}")
    dispatcher.subscribe(on_document)
    dispatcher.start()


class ZeroMQ:
    """bluesky's 0MQ transport: ``Publisher`` here, ``Proxy`` and ``RemoteDispatcher``
    processes (spawned: this process runs threads)."""

    def __init__(self, catalog: Any, profiles_dir: Path) -> None:
        from bluesky.callbacks.zmq import Publisher

        self.context = multiprocessing.get_context("spawn")
        self.catalog = catalog
        self.profiles_dir = profiles_dir
        self.in_port, self.out_port = free_port(), free_port()
        self.reports: Any = self.context.Queue()
        self.proxy = self.context.Process(target=_proxy_main, args=(self.in_port, self.out_port),
                                          daemon=True)
        self.proxy.start()
        address = f"127.0.0.1:{self.in_port}"
        self.publisher = Publisher(address)  # the RunEngine's
        self._pinger = Publisher(address)  # the handshake's: 0MQ sockets are one thread's
        self.dispatcher: Any = None
        self.start_dispatcher()

    def start_dispatcher(self, timeout: float = 60.0) -> None:
        """Start a dispatcher and return once documents published here reach it."""
        self.dispatcher = self.context.Process(
            target=_dispatcher_main,
            args=(self.out_port, str(self.catalog.directory), str(self.profiles_dir),
                  self.reports),
            daemon=True,
        )
        self.dispatcher.start()
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pinger("start", {"handshake": token})
            try:
                if self.reports.get(timeout=0.1) == ("handshake", token):
                    return
            except queue.Empty:
                pass
        raise RuntimeError("the 0MQ dispatcher did not receive documents within 60 s")

    def kill_dispatcher(self) -> None:
        os.kill(self.dispatcher.pid, signal.SIGKILL)
        self.dispatcher.join()

    def stop_report(self, uid: str, timeout: float) -> tuple[Any, ...] | None:
        """The dispatcher's report of ``uid``'s stop document, None if none came."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                report = self.reports.get(timeout=left)
            except queue.Empty:
                break
            if report[0] == "stop" and report[1] == uid:
                return tuple(report)
        return None

    def close(self) -> None:
        self.publisher.close()
        self._pinger.close()
        for process in (self.dispatcher, self.proxy):
            if process is not None and process.is_alive():
                process.kill()
                process.join()


def catalog_view(reader: Any, uid: str | None, meters: Sequence[Any]) -> tuple[bool, int, int]:
    """What ``reader`` (a client of its own) reads of run ``uid``: (stop document there,
    samples catalogued, samples the meters delivered)."""
    delivered = sum(m.last_summary.received_samples for m in meters if m.last_summary)
    if uid is None:
        return False, 0, delivered
    try:
        run = reader[uid]
    except KeyError:
        return False, 0, delivered
    catalogued = 0
    for meter in meters:
        try:
            catalogued += int(run[meter.name][f"{meter.name}_time"].shape[0])
        except KeyError:
            pass
    return bool(run.metadata.get("stop")), catalogued, delivered


def describe(view: tuple[bool, int, int]) -> str:
    stopped, catalogued, delivered = view
    return (f"stop document {'there' if stopped else 'MISSING'}, samples "
            f"{catalogued:,} of {delivered:,}")


def fly(
    engine: RunEngine, way: str, meters: Sequence[Any], seconds: float, catalog: Any,
    server: TiledServer, zeromq: ZeroMQ, kill: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One fly on ``engine`` recorded by ``way`` (its subscriptions are this fly's only: one
    RunEngine for all flies, as each keeps a thread); ``kill`` runs half-way through the data."""
    marks = Marks()
    uids: list[str] = []
    timers: list[threading.Timer] = []

    def on_msg(msg: Any) -> None:
        marks.msg(msg)
        if kill is not None and msg.command == "kickoff" and not timers:
            timers.append(threading.Timer(seconds / 2, kill))
            timers[0].start()

    engine.msg_hook = on_msg
    tokens = [
        engine.subscribe(marks.doc),  # first: it sees the stop document before any writer
        engine.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None),
    ]
    client: Any = None
    timed: StopTimed | None = None
    if way in ("in-process", "server"):
        client = catalog.client if way == "in-process" else connect_server(server.uri,
                                                                            server.api_key)
        timed = StopTimed(make_tiled_writer(client))
        tokens.append(engine.subscribe(timed))
    elif way == "0mq":
        tokens.append(engine.subscribe(zeromq.publisher))
    else:
        tokens.append(engine.subscribe(catalog.document_sink()))
    restarts = catalog.document_sink().restarts
    reader = catalog.open()  # opened now: reading at the return must not wait for an app
    cpu0, t0 = cpu_seconds(), time.monotonic()
    ended = "completed"
    try:
        engine(plans.synchronized_fly(meters, seconds, start_in=0))
    except Exception as exc:
        ended = f"RE raised {type(exc).__name__}: {exc}"[:160]
    finally:
        for token in tokens:
            engine.unsubscribe(token)
        engine.msg_hook = None
    wall = time.monotonic() - t0
    cpu = cpu_seconds() - cpu0
    uid = uids[0] if uids else None
    at_return = catalog_view(reader, uid, meters)
    for timer in timers:
        timer.join()
    close = float("nan")
    detail = ""
    if way == "0mq" and uid is not None:
        report = zeromq.stop_report(uid, timeout=120.0)
        if report is not None and marks.stop_wall is not None:
            close = report[2] - marks.stop_wall
            detail = f"; dispatcher wrote {report[3]} documents, refused {report[4]}"
            detail += f" (first: {report[5]})" if report[4] else ""
        else:
            detail = "; the dispatcher never took the stop document"
    elif way == "sink":
        sink = catalog.document_sink()
        close = sink.last_close_s if ended == "completed" else close
        if sink.restarts > restarts:
            detail = f"; the sink restarted its writer {sink.restarts - restarts} time(s)"
    elif timed is not None and timed.stop_handling:
        close = timed.stop_handling[0]
    after = catalog_view(reader, uid, meters)
    close_client(reader)
    if client is not None and way == "server":
        close_client(client)
    return {"wall": wall, "cpu": cpu, "close": close, "ended": ended, "at_return": at_return,
            "after": after, "detail": detail}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--kill", action="store_true",
                        help="also fly each way with its writing process killed half-way")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-transport-"))
    profiles_dir = work / "profiles"
    catalog = setup_embedded_catalog(work / "catalog", PROFILE, profiles_dir=profiles_dir)
    server = TiledServer(catalog, work / "tiled.log")
    zeromq: ZeroMQ | None = None
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"host: {host_load()}; {args.meters} meters x 8 kHz x 6 channels, "
              f"{args.seconds:g} s per fly", flush=True)
        server.start()
        zeromq = ZeroMQ(catalog, profiles_dir)
        catalog.document_sink().wait_ready()
        kills: dict[str, Callable[[], None]] = {
            "server": lambda: (server.kill(), server.start()),
            "0mq": lambda: (zeromq.kill_dispatcher(), zeromq.start_dispatcher()),
            "sink": lambda: os.kill(catalog.document_sink().writer_pid, signal.SIGKILL),
        }
        engine = RunEngine({})
        with Emulators(args.meters) as emulators:
            meters = smartmeters(emulators.described, catalog)
            with destroyed(meters):
                for way in args.ways:
                    r = results[way] = fly(engine, way, meters, args.seconds, catalog,
                                           server, zeromq)
                    print(f"{way:10}: wall {r['wall']:6.2f} s (overhead "
                          f"{r['wall'] - args.seconds:5.2f} s), CPU here {r['cpu']:5.2f} s, "
                          f"stop -> run closed {r['close']:6.3f} s; when RE returned: "
                          f"{describe(r['at_return'])}{r['detail']}; {host_load()}",
                          flush=True)
                if args.kill:
                    for way in (w for w in args.ways if w in kills):
                        r = fly(engine, way, meters, args.seconds, catalog, server, zeromq,
                                kills[way])
                        print(f"{way:10}, writer killed at +{args.seconds / 2:g} s and "
                              f"started again: run {r['ended']} (wall {r['wall']:.2f} s); "
                              f"in the catalog: {describe(r['after'])}{r['detail']}",
                              flush=True)
    finally:
        if zeromq is not None:
            zeromq.close()
        server.stop()
        catalog.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"stop to run closed, {args.meters} meters: "
          + ", ".join(f"{way} {results[way]['close']:.3f} s"
                      for way in ("sink", "server", "0mq", "in-process") if way in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
