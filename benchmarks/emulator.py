"""Emulator cost: CPU seconds per meter per second of 8 kHz × 6-channel TCP sampling.

Starts K meters in a child process (``python -m smartmeter_ophyd.emulator``), connects one
TCP client per meter from this process, starts ``sample`` at 8000 Hz (default measures) and
just drains the bytes.  The child's CPU time (utime+stime from /proc/<pid>/stat) over the
sampling window gives the cost per meter-second and the implied number of meters one core
can emulate in real time.  Also printed: CPU/wall ratio of the emulator process and the
fraction of the expected samples that actually arrived (1.0 = keeping up with real time).

Usage: python benchmarks/emulator.py [--counts 4 8 16] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
RATE = 8000
BYTES_PER_SAMPLE = 24


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


async def drain(reader: asyncio.StreamReader, counter: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        data = await reader.read(1 << 16)
        if not data:
            return
        counter[0] += len(data)


async def run_once(count: int, seconds: float) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartmeter_ophyd.emulator", "--count", str(count),
        "--no-serial", "--no-truth", "--time-server", "127.0.0.1", "--ntp-port", "9",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    meters = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in range(count)]
    conns = [await asyncio.open_connection("127.0.0.1", m["command_port"]) for m in meters]
    for reader, _ in conns:
        await reader.readline()  # info line
    stop = asyncio.Event()
    counters = [[0] for _ in conns]
    cmd = json.dumps({"cmd": "sample", "payload": {"type": "TCP", "rate": RATE}}).encode() + b"\n"
    for _, writer in conns:
        writer.write(cmd)
    tasks = [asyncio.create_task(drain(r, c, stop)) for (r, _), c in zip(conns, counters, strict=True)]
    await asyncio.sleep(0.5)  # settle
    bytes0 = sum(c[0] for c in counters)
    cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
    bytes1 = sum(c[0] for c in counters)
    stop.set()
    for _, writer in conns:
        writer.close()
    for t in tasks:
        t.cancel()
    proc.terminate()
    await proc.wait()
    wall = wall1 - wall0
    cpu = cpu1 - cpu0
    per_meter_second = cpu / (count * wall)
    return {
        "meters": count,
        "cpu_s_per_meter_s": per_meter_second,
        "meters_per_core": 1 / per_meter_second if per_meter_second > 0 else float("inf"),
        "cpu_over_wall": cpu / wall,
        "realtime_ratio": (bytes1 - bytes0) / (count * wall * RATE * BYTES_PER_SAMPLE),
    }


async def main(counts: list[int], seconds: float) -> None:
    print(f"{'meters':>6} {'cpu s/meter·s':>14} {'meters/core':>11} {'cpu/wall':>8} {'data/realtime':>13}")
    for count in counts:
        r = await run_once(count, seconds)
        print(f"{r['meters']:>6} {r['cpu_s_per_meter_s']:>14.4f} {r['meters_per_core']:>11.1f} "
              f"{r['cpu_over_wall']:>8.2f} {r['realtime_ratio']:>13.3f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    asyncio.run(main(args.counts, args.seconds))
