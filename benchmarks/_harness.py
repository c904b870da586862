"""Shared parts of the fleet, run-overhead, document-transport and soak benchmarks (not a benchmark itself).

* :class:`Emulators` - N emulated meters in CHILD processes (``python -m
  smartmeter_ophyd.emulator``, ``per_process`` meters each), synced by the real chrony of
  ``scripts/services.sh`` so ``startTs`` is a real time and the NTP gate can pass;
* :func:`smartmeters` - connected ``SmartMeter`` devices on them;
* :func:`loss_report` - zero loss, per meter, from the meters' own stop replies (§4.8) and the
  catalog's shapes: every sample the meter sampled was sent, received, declared nowhere
  missing, and is in the catalog;
* :class:`Sampler` - this process's threads, RSS and CPU sampled in the background;
* :class:`CpuTimeline` - CPU of this process's threads and of its child processes by role,
  sampled in the background, to cut a window from afterwards;
* :class:`Marks` - host times of the RunEngine messages and documents that bound a fly's
  phases (open_run, kickoff, the release, the stop document); :class:`StopTimed` - a
  writer's time at the stop document.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def ntp_address() -> tuple[str, int]:
    """(host, port) of the chronyd ``scripts/services.sh`` started."""
    env = Path(os.environ.get("SMARTMETER_SERVICES_ENV", ROOT / "var" / "run" / "services.env"))
    values: dict[str, str] = {}
    if env.is_file():
        for line in env.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    if not values.get("SMARTMETER_NTP_PORT"):
        raise SystemExit(f"no chrony recorded in {env}: run `scripts/services.sh start ntp`")
    return values.get("SMARTMETER_NTP_HOST", "127.0.0.1"), int(values["SMARTMETER_NTP_PORT"])


class Emulators:
    """Emulated meters in child processes; ``described`` holds each meter's JSON line."""

    def __init__(self, count: int, per_process: int = 10) -> None:
        self.count = count
        self.per_process = max(1, per_process)
        self.children: list[subprocess.Popen[str]] = []
        self.described: list[dict[str, Any]] = []

    def __enter__(self) -> Emulators:
        host, port = ntp_address()
        remaining, index, counts = self.count, 0, []
        try:
            while remaining:
                n = min(self.per_process, remaining)
                child = subprocess.Popen(
                    [sys.executable, "-m", "smartmeter_ophyd.emulator", "--count", str(n),
                     "--no-serial", "--no-truth", "--boot-delay", "0.2",
                     "--name-prefix", f"fleet{index}_", "--time-server", host,
                     "--ntp-port", str(port)],
                    stdout=subprocess.PIPE, text=True,
                )
                self.children.append(child)
                counts.append(n)
                remaining -= n
                index += 1
            for child, n in zip(self.children, counts, strict=True):
                assert child.stdout is not None
                for _ in range(n):
                    line = child.stdout.readline()
                    if not line:
                        raise RuntimeError(f"emulator process {child.pid} exited early")
                    self.described.append(json.loads(line))
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)


def smartmeters(described: Sequence[dict[str, Any]], catalog: Any) -> list[Any]:
    """Connected SmartMeter devices ``m0..m{N-1}`` writing below the catalog's data directory."""
    from smartmeter_ophyd.devices import SmartMeter

    meters = [
        SmartMeter(d["host"], d["command_port"], name=f"m{i}",
                   data_directory=catalog.data_directory,
                   readable_root=catalog.readable_storage, timeout=5.0)
        for i, d in enumerate(described)
    ]
    for meter in meters:
        meter.connect()
    return meters


@contextmanager
def destroyed(meters: Sequence[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for meter in meters:
            meter.destroy()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of this process (or of another one, from /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | None = None) -> float:
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Sampler:
    """Samples threads (peak), RSS and CPU of this process every ``period`` s."""

    period: float = 0.05
    peak_threads: int = 0
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    """(monotonic time, RSS MB, CPU s)"""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="benchmark sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_threads = max(self.peak_threads, threading.active_count() - 1)
            self.samples.append((time.monotonic(), rss_mb(), cpu_seconds()))
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _ticks(stat: str) -> float:
    """utime + stime in seconds, from the text of a /proc stat file."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROLES = (("smartmeter_ophyd.storage._alignment_main", "alignment workers"),
         ("smartmeter_ophyd.storage._writer_main", "catalog writer"),
         ("smartmeter_ophyd.emulator", "emulators"))
"""Child processes by their command line; any other child counts as "other children"."""


class CpuTimeline:
    """CPU seconds used so far by this process's threads (by name) and by its child
    processes (by role, :data:`ROLES`), sampled every ``period`` s on a thread of its own.

    Each sample is stamped when it is read, so a sample taken late (the thread waits for
    the GIL like any other) is still exact; :meth:`used` interpolates between samples.  The
    children are looked up once a second (``/proc``, children of children included).
    """

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._children: dict[int, str] = {}
        self._last: dict[int, float] = {}
        self._found = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu timeline", daemon=True)

    def __enter__(self) -> CpuTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _find_children(self) -> None:
        parents: dict[int, int] = {}
        commands: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            commands[int(entry)] = command.decode(errors="replace")
        mine = {os.getpid()}
        grew = True
        while grew:
            found = {pid for pid, parent in parents.items() if parent in mine} - mine
            grew = bool(found)
            mine |= found
        mine.discard(os.getpid())
        for pid in mine:
            if pid not in self._children:
                role = next((r for key, r in ROLES if key in commands[pid]), "other children")
                self._children[pid] = role

    def _sample(self) -> dict[str, float]:
        used: dict[str, float] = {}
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            try:
                ticks = _ticks(Path(f"/proc/self/task/{tid}/stat").read_text())
            except OSError:
                continue
            key = f"acquisition: {names.get(int(tid), 'other threads')}"
            used[key] = used.get(key, 0.0) + ticks
        for pid, role in self._children.items():
            try:
                self._last[pid] = _ticks(Path(f"/proc/{pid}/stat").read_text())
            except OSError:
                pass  # exited: it counts with its last reading
            used[role] = used.get(role, 0.0) + self._last.get(pid, 0.0)
        return used

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            if now - self._found >= 1.0:
                self._find_children()
                self._found = now
            self.samples.append((time.time(), self._sample()))
            self._stop.wait(self.period)

    def _at(self, t: float) -> dict[str, float]:
        times = [s[0] for s in self.samples]
        k = bisect.bisect_left(times, t)
        if k == 0:
            return dict(self.samples[0][1])
        if k >= len(times):
            return dict(self.samples[-1][1])
        (t0, a), (t1, b) = self.samples[k - 1], self.samples[k]
        w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        return {key: a.get(key, 0.0) + w * (b.get(key, 0.0) - a.get(key, 0.0))
                for key in a.keys() | b.keys()}

    def used(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each thread or role used between two ``time.time()`` instants (a
        process that exited counts with its last reading, up to ``period`` short)."""
        a, b = self._at(start), self._at(end)
        return {key: max(0.0, b.get(key, 0.0) - a.get(key, 0.0)) for key in a.keys() | b.keys()}


class Marks:
    """Host times of the messages and documents that bound each phase."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self._release_wait = False
        self.scheduled_start: float | None = None
        self.release_wall: float | None = None
        self.stop_wall: float | None = None
        self.writer_pid: int | None = None
        self.writer_cpu = 0.0

    def msg(self, msg: Any) -> None:
        now = time.monotonic()
        if self._release_wait:
            self.t.setdefault("released", now)
            self.release_wall = self.release_wall or time.time()
            self._release_wait = False
        if msg.command == "open_run":
            self.t.setdefault("open_run", now)
        elif msg.command == "kickoff":
            self.t.setdefault("kickoff", now)
        elif msg.command == "wait" and str(msg.kwargs.get("group", "")).startswith("release"):
            self._release_wait = True

    def doc(self, name: str, doc: dict[str, Any]) -> None:
        if name == "stop":
            self.t["stop"] = time.monotonic()
            self.stop_wall = time.time()
            if self.writer_pid is not None:
                self.writer_cpu = cpu_seconds(self.writer_pid)
        elif name == "event_page" and self.scheduled_start is None:
            starts = doc["data"].get("scheduled_start", [])  # the synchronization table
            if starts and starts[0] == starts[0]:  # not NaN: a scheduled start
                self.scheduled_start = float(starts[0])


class StopTimed:
    """A document callback around ``writer`` that times its handling of the stop document
    (``TiledWriter`` writes synchronously: that is its stop -> run closed)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.stop_handling: list[float] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        t0 = time.monotonic()
        self.writer(name, doc)
        if name == "stop":
            self.stop_handling.append(time.monotonic() - t0)


@dataclass(frozen=True)
class MeterLoss:
    meter: str
    sampled: int | None
    sent: int | None
    received: int
    missing: int
    in_catalog: int | None

    @property
    def zero(self) -> bool:
        return (
            self.missing == 0
            and self.sampled is not None
            and self.sampled == self.sent == self.received
            and (self.in_catalog is None or self.in_catalog == self.received)
        )

    def __str__(self) -> str:
        return (f"{self.meter}: sampled {self.sampled}, sent {self.sent}, received "
                f"{self.received}, declared missing {self.missing}, in catalog {self.in_catalog}")


def loss_report(meters: Sequence[Any], run: Any | None) -> list[MeterLoss]:
    """Per meter: the stop reply's counts (§4.8) against what was received and catalogued."""
    report = []
    for meter in meters:
        summary = meter.last_summary
        if summary is None:
            report.append(MeterLoss(meter.name, None, None, 0, 0, None))
            continue
        in_catalog = None
        if run is not None:
            in_catalog = int(run[meter.name][f"{meter.name}_time"].shape[0])
        report.append(MeterLoss(
            meter.name, summary.device_samples, summary.device_sent_samples,
            summary.received_samples, summary.missing_declared, in_catalog,
        ))
    return report


def host_load() -> str:
    """The load average and CPU count, to print next to every figure."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min)"
