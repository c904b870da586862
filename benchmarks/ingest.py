"""Client ingest cost: CPU seconds per MB received from N meters at 8 kHz × 6 channels.

The emulators run in a CHILD process (``python -m smartmeter_ophyd.emulator``); this process
is only the client, so ``time.process_time()`` measures the client alone.  Two phases in the
same run, against the same meters and the same kind of bytes (prefixed TCP frames of
sampling sessions on the command connections):

1. ``AsyncMeterClient`` x N: connect, ``sample(rate=8000)``, consume every block for
   ``--seconds``, stop and reconcile.
2. Baseline: plain sockets, send the same ``sample`` line, then a ``selectors`` loop of
   ``socket.recv_into`` into a preallocated buffer (no decoding at all) for ``--seconds``.

Prints CPU ms per MB for both and their ratio.  Target: client <= 2 ms CPU per MB.
``--coalesce`` lets the client sleep briefly after small reads while streaming (fewer, larger
reads for the same bytes; adds that much latency).

Usage: ``python benchmarks/ingest.py --meters 4 --seconds 10``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import selectors
import socket
import subprocess
import sys
import time

from smartmeter_ophyd.client import AsyncMeterClient
from smartmeter_ophyd.protocol import Sample, Transport

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


async def run_client(
    ports: list[int], seconds: float, coalesce: float
) -> tuple[tuple[float, float], int, list]:
    clients = [
        AsyncMeterClient("127.0.0.1", port, timeout=5.0, coalesce_s=coalesce) for port in ports
    ]
    for client in clients:
        await client.connect()
    received_before = sum(c.bytes_received for c in clients)
    sessions = [await c.sample(rate=8000) for c in clients]

    async def consume(session) -> int:
        n = 0
        async for block in session:
            n += block.n_samples
        return n

    consumers = [asyncio.create_task(consume(s)) for s in sessions]
    cpu0 = cpu_times()
    bytes0 = sum(c.bytes_received for c in clients)
    await asyncio.sleep(seconds)
    cpu1 = cpu_times()
    cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
    nbytes = sum(c.bytes_received for c in clients) - bytes0
    summaries = [await s.stop() for s in sessions]
    await asyncio.gather(*consumers)
    for client in clients:
        await client.close()
    del received_before
    return cpu, nbytes, summaries


def run_baseline(ports: list[int], seconds: float) -> tuple[tuple[float, float], int]:
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
    total = 0
    cpu0 = cpu_times()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            try:
                total += key.fileobj.recv_into(view)  # type: ignore[union-attr]
            except BlockingIOError:
                pass
    cpu1 = cpu_times()
    cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
    for sock in socks:
        sock.sendall(stop_line)
    time.sleep(0.3)
    for sock in socks:
        selector.unregister(sock)
        sock.close()
    return cpu, total


def run_offline(total_mb: float, chunk: int) -> tuple[float, int]:
    """The client's own receive path (decode + dispatch + session) without sockets or loop
    wake-ups: frames as an 8 kHz × 6 ch TCP session sends them, fed in ``chunk``-byte reads."""
    import numpy as np

    from smartmeter_ophyd.client._session import SamplingSession
    from smartmeter_ophyd.protocol import encode_frames
    from smartmeter_ophyd.protocol._decoder import StreamDecoder, classify_info_text
    from smartmeter_ophyd.protocol._replies import SampleReply, parse_reply

    reply_line = (
        '{"error":false,"cmd":"sample","measures":"v,i,v,i,v,i","chunksize":1008,'
        '"samplingrate":8000,"conn_type":"TCP","measurements":6,"prefix":true,'
        '"flowCtr":false,"unit":"V,mA,V,mA,V,mA","startTs":"0.000"}'
    )
    frames = encode_frames(0, np.random.default_rng(0).random((42 * 2000, 6), np.float32), 42)

    class _QuietLink:
        def pause_reading(self) -> None: ...

    async def feed() -> tuple[float, int]:
        client = AsyncMeterClient("offline", 0)
        link = _QuietLink()
        client._link = link  # type: ignore[assignment]
        decoder = StreamDecoder()
        reply = classify_info_text(reply_line)
        decoder.start_session(6, 1008, True)
        view = parse_reply(reply, "sample")  # type: ignore[arg-type]
        assert isinstance(view, SampleReply)
        session = SamplingSession(meter="offline", reply=view, transport=Transport.TCP,
                                  send_stop=None, send_cts=None, send_request=None)
        client._session = session
        fed = 0
        cpu0 = cpu_times()
        while fed < total_mb * MB:
            for start in range(0, len(frames), chunk):
                piece = frames[start : start + chunk]
                client._on_data(link, decoder, piece)  # type: ignore[arg-type]
                fed += len(piece)
                session.drain_nowait()
            decoder = StreamDecoder()
            decoder.start_session(6, 1008, True)
        cpu1 = cpu_times()
        if client._release_handle is not None:
            client._release_handle.cancel()
        return (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]), fed

    return asyncio.run(feed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--coalesce", type=float, default=0.0,
                        help="client: sleep this long after a small read while streaming")
    args = parser.parse_args()
    child, meters = start_emulators(args.meters)
    try:
        ports = [int(m["command_port"]) for m in meters]  # type: ignore[call-overload]
        cpu, nbytes, summaries = asyncio.run(run_client(ports, args.seconds, args.coalesce))
        base_cpu, base_bytes = run_baseline(ports, args.seconds)
    finally:
        child.terminate()
        child.wait(10)
    def per_mb(seconds: float, nbytes: int) -> float:
        return 1000 * seconds / (nbytes / MB)

    client_ms = per_mb(sum(cpu), nbytes)
    base_ms = per_mb(sum(base_cpu), base_bytes)
    reconciled = sum(1 for s in summaries if s.explained)
    print(f"meters: {args.meters} x 8000 Hz x 6 ch over loopback TCP, {args.seconds:.0f} s per phase,"
          f" coalesce {args.coalesce} s")
    for label, (user, system), size in (
        ("client", cpu, nbytes),
        ("recv_into", base_cpu, base_bytes),
    ):
        print(f"{label:>9}: {size / MB:7.2f} MB  CPU user {user:6.3f} s + sys {system:6.3f} s"
              f"  -> {per_mb(user + system, size):7.3f} ms/MB"
              f" (user only {per_mb(user, size):7.3f} ms/MB)")
    print(f"sessions reconciled at stop: {reconciled}/{len(summaries)}")
    print(f"ratio client / recv_into (user+sys): {client_ms / base_ms:.2f}; "
          f"user only: {per_mb(cpu[0], nbytes) / per_mb(base_cpu[0], base_bytes):.2f}")
    print(f"target <= 2 ms CPU per MB: {'met' if client_ms <= 2.0 else 'NOT met'}")
    print("client receive path alone (no sockets, no loop wake-ups), by read size:")
    for chunk in (5_000, 64_000, 256_000):
        offline_cpu, fed = run_offline(20.0, chunk)
        print(f"  {chunk:>7} B reads: {per_mb(offline_cpu, fed):6.3f} ms CPU/MB")

if __name__ == "__main__":
    main()
