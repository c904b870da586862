"""Client ingest cost: CPU seconds per MB received from N meters at 8 kHz × 6 channels.

The emulators run in a CHILD process (``python -m smartmeter_ophyd.emulator``); this process
is only the client, so ``getrusage(RUSAGE_SELF)`` measures the client alone.  Three phases in
the same run, against the same meters and the same kind of bytes (prefixed TCP frames of
sampling sessions on the command connections), each measured over ``--seconds`` of steady
state (after ``--warmup`` seconds, so that the client's read batching has switched on):

1. ``AsyncMeterClient`` x N: connect, ``sample(rate=8000)``, consume every block, stop and
   reconcile every session against the meter's stop reply.
2. Baseline "per wake-up": plain sockets, the same ``sample`` line, then a ``selectors``
   loop doing one ``socket.recv_into`` (reused buffer, no decoding) per readable event.
3. Baseline "batched": the same loop with the same receive low-water mark (SO_RCVLOWAT) the
   client uses while streaming, i.e. the same number of bytes per wake-up.

Prints, per phase, MB received and CPU ms/MB (user+sys), and both ratios client/baseline.
The headline ratio is client / batched baseline (like with like: same bytes per wake-up);
the ratio to the per-wake-up baseline shows the gain over a naive reader.  Target: client
<= 2 ms CPU per MB.  ``--batch 0`` measures the client without batching (then the batched
baseline equals the per-wake-up one).  Finally the client's receive path is fed without
sockets at several read sizes (decode + dispatch + session only), back to back (hot caches)
and with a sleep between reads (cold caches, as in real time).

Usage: ``python benchmarks/ingest.py --meters 1 4 16 --seconds 10``  (per count: about
3.5 x seconds + 10 s).  The 16-meter case shows what one loop costs for a larger fleet: the
loop's one timer reads every batched meter in one callback per ``batch_s``, so the fixed
cost of a wake-up is shared; on a 2-core machine the emulators of 16 meters may not keep up
with real time, which the MB figures show.

``--profile`` adds, per meter count, one more client phase with the receive path timed
stage by stage (thread CPU time around each stage, so slightly inflated): per shared tick,
how much went to decoding (``_on_data``: decoder, dispatch, session), to the socket reads,
to the timer's own work, and to the rest of the loop (``epoll``, waking the consumers'
tasks); and the decode cost of the first read of a tick (cold caches) against the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from smartmeter_ophyd.client import AsyncMeterClient
from smartmeter_ophyd.client._batcher import BATCH_MAX_BYTES, BATCH_MIN_BYTES, DEFAULT_BATCH_S
from smartmeter_ophyd.protocol import Measures, Sample, Transport

MB = 1_000_000


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def start_emulators(count: int) -> tuple[subprocess.Popen[str], list[dict[str, object]]]:
    child = subprocess.Popen(
        [sys.executable, "-m", "smartmeter_ophyd.emulator", "--count", str(count),
         "--no-serial", "--no-truth", "--boot-delay", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    meters = [json.loads(child.stdout.readline()) for _ in range(count)]
    return child, meters


def batch_bytes(batch_s: float) -> int:
    """The low-water mark the client sets for an 8 kHz VI session (same clamp)."""
    wanted = int(8000 * Measures.VI.bytes_per_sample * batch_s)
    return 1 if wanted < BATCH_MIN_BYTES else min(BATCH_MAX_BYTES, wanted)


async def run_client(
    ports: list[int], seconds: float, warmup: float, coalesce: float, batch: float
) -> tuple[tuple[float, float], int, list, int]:
    clients = [
        AsyncMeterClient("127.0.0.1", port, timeout=5.0, coalesce_s=coalesce, batch_s=batch)
        for port in ports
    ]
    for client in clients:
        await client.connect()
    sessions = [await c.sample(rate=8000) for c in clients]

    async def consume(session) -> int:
        n = 0
        async for block in session:
            n += block.n_samples
        return n

    consumers = [asyncio.create_task(consume(s)) for s in sessions]
    await asyncio.sleep(warmup)
    cpu0 = cpu_times()
    bytes0 = sum(c.bytes_received for c in clients)
    await asyncio.sleep(seconds)
    cpu1 = cpu_times()
    cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
    nbytes = sum(c.bytes_received for c in clients) - bytes0
    batching = sum(1 for c in clients if c.batch_raises)
    summaries = [await s.stop() for s in sessions]
    await asyncio.gather(*consumers)
    for client in clients:
        await client.close()
    return cpu, nbytes, summaries, batching


def run_baseline(
    ports: list[int], seconds: float, warmup: float, low_water: int
) -> tuple[tuple[float, float], int, int]:
    """recv_into per readable event; ``low_water`` > 1 sets SO_RCVLOWAT like the client."""
    sample_line = Sample(transport=Transport.TCP, rate=8000).encode()
    stop_line = b'{"cmd":"stop"}\n'
    selector = selectors.DefaultSelector()
    socks = []
    for port in ports:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    buffer = bytearray(1 << 18)
    view = memoryview(buffer)
    time.sleep(0.3)  # the info line and lifeness lines
    for sock in socks:
        while True:
            try:
                if not sock.recv_into(view):
                    break
            except BlockingIOError:
                break
        sock.sendall(sample_line)
        if low_water > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)

    def pump(until: float) -> tuple[int, int]:
        total = wakes = 0
        while (left := until - time.monotonic()) > 0:
            for key, _ in selector.select(min(left, 1.0)):  # no idle wake-ups of its own
                wakes += 1
                try:
                    total += key.fileobj.recv_into(view)  # type: ignore[union-attr]
                except BlockingIOError:
                    pass
        return total, wakes

    pump(time.monotonic() + warmup)
    cpu0 = cpu_times()
    total, wakes = pump(time.monotonic() + seconds)
    cpu1 = cpu_times()
    cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        sock.sendall(stop_line)
    time.sleep(0.3)
    for sock in socks:
        selector.unregister(sock)
        with contextlib.suppress(BlockingIOError):
            while sock.recv_into(view):  # closing with unread bytes would reset the meter's end
                pass
        sock.close()
    return cpu, total, wakes


class _OfflineLink:
    """Stands in for a TCP link: the client's receive path is fed by hand."""

    receive_low_water = 1
    is_closing = False
    peer_host = local_host = "offline"

    def attach(self, sink) -> None:  # type: ignore[no-untyped-def]
        self.sink = sink

    def set_receive_low_water(self, nbytes: int) -> bool:
        self.receive_low_water = nbytes
        return True

    def pause_reading(self) -> None: ...

    def read_now(self) -> int:
        return 0  # the bytes are pushed by hand


def run_offline(total_mb: float, chunk: int, pause_s: float = 0.0) -> tuple[float, int]:
    """The client's own receive path (connection + decode + dispatch + session) without
    sockets or loop wake-ups: frames as an 8 kHz x 6 ch TCP session sends them, fed in
    ``chunk``-byte reads to the sink the client attaches to its link.

    ``pause_s`` sleeps between reads (not counted) as a real-time reader does: the same code
    then runs with cold caches, which is what a wake-up per batch really costs."""
    import numpy as np

    from smartmeter_ophyd.client import SamplingSession
    from smartmeter_ophyd.protocol import (
        MeterConnection,
        SampleReply,
        classify_info_text,
        encode_frames,
        parse_reply,
    )

    reply_line = (
        '{"error":false,"cmd":"sample","measures":"v,i,v,i,v,i","chunksize":1008,'
        '"samplingrate":8000,"conn_type":"TCP","measurements":6,"prefix":true,'
        '"flowCtr":false,"unit":"V,mA,V,mA,V,mA","startTs":"0.000"}'
    )
    reads = max(1, int(total_mb * MB) // chunk)
    frames = encode_frames(
        0, np.random.default_rng(0).random((42 * (reads * chunk // 1008 + 2), 6), np.float32), 42
    )
    view = parse_reply(classify_info_text(reply_line), "sample")  # type: ignore[arg-type]
    assert isinstance(view, SampleReply)

    async def feed() -> tuple[float, int]:
        client = AsyncMeterClient("offline", 0)
        link, connection = _OfflineLink(), MeterConnection()
        client.keeper.link, client.keeper.connection = link, connection  # type: ignore[assignment]
        client.link_ready(link, connection, [])  # type: ignore[arg-type]
        connection.decoder.start_session(6, 1008, True)
        session = SamplingSession(meter="offline", reply=view, transport=Transport.TCP,
                                  send_stop=None, send_cts=None, send_request=None)
        client._adopt_session(session, 8000 * Measures.VI.bytes_per_sample)
        buffer = memoryview(frames)
        fed = 0
        cpu = 0.0
        for start in range(0, reads * chunk, chunk):
            piece = buffer[start : start + chunk]  # a view, as the read buffer hands it over
            cpu0 = time.thread_time()
            link.sink(piece)
            session.drain_nowait()
            cpu += time.thread_time() - cpu0
            fed += len(piece)
            if pause_s:
                time.sleep(pause_s)
        client._batcher.unwatch()
        return cpu, fed

    return asyncio.run(feed())


class StageTimer:
    """Thread CPU time spent in chosen functions while ``active`` (``--profile``)."""

    def __init__(self) -> None:
        self.active = False
        self.spent: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.thread_time_ns()
            try:
                return original(*args, **kwargs)
            finally:
                if self.active:
                    self.spent[label].append((time.monotonic(), time.thread_time_ns() - start))

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def total_ms(self, label: str) -> float:
        return sum(ns for _, ns in self.spent.get(label, [])) / 1e6


def run_profiled(ports: list[int], args: argparse.Namespace) -> list[str]:
    """The client phase again, timed stage by stage: lines saying where a tick's CPU goes."""
    import asyncio.base_events

    from smartmeter_ophyd.client import _timer, _transports

    stages = StageTimer()
    stages.wrap(asyncio.base_events.BaseEventLoop, "_run_once", "loop")
    stages.wrap(_timer.LoopTimer, "_fire", "timer")
    stages.wrap(_transports.TcpLink, "read_now", "read")
    stages.wrap(AsyncMeterClient, "_on_data", "decode")
    original_cpu = cpu_times

    def switching_cpu_times() -> tuple[float, float]:
        stages.active = not stages.active  # run_client reads the clock at start and end
        return original_cpu()

    globals()["cpu_times"] = switching_cpu_times
    try:
        cpu, nbytes, _, _ = asyncio.run(
            run_client(ports, args.seconds, args.warmup, args.coalesce, args.batch))
    finally:
        globals()["cpu_times"] = original_cpu
        stages.restore()
    first, later, last = [], [], -1.0
    for at, ns in stages.spent["decode"]:
        (later if at - last < 0.002 else first).append(ns / 1e3)
        last = at
    ticks = max(1, len(first))  # callbacks (or wake-ups) that read
    loop, timer = stages.total_ms("loop"), stages.total_ms("timer")
    read, decode = stages.total_ms("read"), stages.total_ms("decode")
    total = 1e3 * (cpu[0] + cpu[1])
    lines = [f"profile (instrumented run): {per_mb(cpu[0] + cpu[1], nbytes):.2f} ms/MB,"
             f" {total:.1f} ms CPU, {len(stages.spent['decode'])} reads in {ticks} bursts,"
             f" {len(stages.spent['timer'])} timer callbacks"]
    rows = [
        ("decode (decoder + dispatch + session)", decode),
        ("socket reads (recv_into, outside decode)", read - decode),
        ("timer callback (ticks, keep-alives)", timer - read),
        ("rest of the loop (epoll, consumer tasks)", loop - timer),
        ("outside the loop", total - loop),
    ]
    for label, ms in rows:
        lines.append(f"  {label:42} {ms:7.2f} ms  {1e3 * ms / ticks:6.0f} us per burst"
                     f"  {100 * ms / max(total, 1e-9):4.0f} %")
    if first:
        lines.append(
            f"  decode of the first read of a burst: median {statistics.median(first):.0f} us"
            f" (cold caches); of the others: median"
            f" {statistics.median(later) if later else float('nan'):.0f} us")
    return lines


def per_mb(seconds: float, nbytes: int) -> float:
    return 1000 * seconds / (nbytes / MB)


def measure(count: int, args: argparse.Namespace, low_water: int) -> dict[str, float]:
    """All three phases against ``count`` emulated meters; prints them, returns ms/MB."""
    child, meters = start_emulators(count)
    try:
        ports = [int(m["command_port"]) for m in meters]  # type: ignore[call-overload]
        cpu, nbytes, summaries, batching = asyncio.run(
            run_client(ports, args.seconds, args.warmup, args.coalesce, args.batch)
        )
        phases = [("client", cpu, nbytes, None)]
        for label, mark in (("recv_into per wake-up", 1), ("recv_into batched", low_water)):
            if label.endswith("batched") and mark <= 1:
                continue
            base_cpu, base_bytes, wakes = run_baseline(ports, args.seconds, args.warmup, mark)
            phases.append((label, base_cpu, base_bytes, wakes))
        profile = run_profiled(ports, args) if args.profile else []
    finally:
        child.terminate()
        child.wait(10)
    print(f"meters: {count} x 8000 Hz x 6 ch over loopback TCP, {args.seconds:.0f} s per"
          f" phase after {args.warmup:.0f} s warm-up; client batch_s {args.batch}"
          f" (SO_RCVLOWAT {low_water} B), coalesce_s {args.coalesce}")
    results = {}
    for label, (user, system), size, wakes in phases:
        results[label] = per_mb(user + system, size)
        extra = "" if wakes is None else f", {wakes / max(size / 1e3, 1e-9):.3f} wake-ups/kB"
        extra += "" if wakes is None else f" ({size / max(wakes, 1) / 1e3:.1f} kB/wake-up)"
        print(f"{label:>22}: {size / MB:7.2f} MB  CPU user {user:6.3f} s + sys {system:6.3f} s"
              f"  -> {results[label]:7.3f} ms/MB{extra}")
    reconciled = sum(1 for s in summaries if s.explained)
    print(f"client sessions batching: {batching}/{len(summaries)}; reconciled at stop (every"
          f" sample the meter sent received or declared): {reconciled}/{len(summaries)}")
    client_ms = results["client"]
    naive = results["recv_into per wake-up"]
    like = results.get("recv_into batched", naive)
    print(f"ratio client / recv_into batched alike (headline, target <= 1.5):"
          f" {client_ms / like:.2f}")
    print(f"ratio client / recv_into per wake-up:                            "
          f" {client_ms / naive:.2f}")
    print(f"target <= 2 ms CPU per MB: {'met' if client_ms <= 2.0 else 'NOT met'}"
          f" ({client_ms:.2f} ms/MB)")
    for line in profile:
        print(line)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds before each measurement (batching switches on)")
    parser.add_argument("--batch", type=float, default=DEFAULT_BATCH_S,
                        help="client batch_s (SO_RCVLOWAT read batching; 0 = off)")
    parser.add_argument("--coalesce", type=float, default=0.0,
                        help="client coalesce_s: sleep this long after a small read")
    parser.add_argument("--profile", action="store_true",
                        help="one more client phase per count, timed stage by stage")
    parser.add_argument("--no-offline", action="store_true",
                        help="skip the receive path measured without sockets")
    args = parser.parse_args()
    low_water = batch_bytes(args.batch)
    for count in args.meters:
        measure(count, args, low_water)
        print()
    if args.no_offline:
        return
    print("client receive path alone (no sockets, no loop wake-ups), by read size:")
    for chunk in (5_000, low_water if low_water > 1 else 48_000, 256_000):
        offline_cpu, fed = run_offline(20.0, chunk)
        cold_cpu, cold_fed = run_offline(chunk * 40 / MB, chunk, pause_s=0.05)
        print(f"  {chunk:>7} B reads: {per_mb(offline_cpu, fed):6.3f} ms CPU/MB back to back,"
              f" {per_mb(cold_cpu, cold_fed):6.3f} ms CPU/MB with a 50 ms sleep between reads"
              f" ({1e6 * cold_cpu / 40:.0f} us per read)")


if __name__ == "__main__":
    main()
