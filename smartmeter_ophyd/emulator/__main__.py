"""``python -m smartmeter_ophyd.emulator``: run N emulated meters in one process.

Prints one JSON line per meter to stdout (name, host, command/stream/control ports, serial
pty) once all are booted, then runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ._meter import EmulatedMeter, EmulatorConfig


def _per_meter(values: list[float] | None, count: int, default: float) -> list[float]:
    if not values:
        return [default] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise SystemExit(f"expected 1 or {count} values, got {len(values)}: {values}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smartmeter-emulator",
        description="Firmware-2.2-faithful SmartMeter emulators on real sockets.",
    )
    p.add_argument("--count", type=int, default=1, help="number of meters (default 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=0,
                   help="meter i uses P+2i (commands) and P+2i+1 (stream); 0 = ephemeral")
    p.add_argument("--name-prefix", default="smartmeter",
                   help="meter names are <prefix><index:03d> (default smartmeter000, ...)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="persist each meter's configuration as <dir>/<name>.json")
    p.add_argument("--time-server", default=None, help="NTP server (default: the stored one)")
    p.add_argument("--ntp-port", type=int, default=123)
    p.add_argument("--offset-ms", type=float, nargs="+", default=None,
                   help="clock offset(s) before NTP, one value or one per meter")
    p.add_argument("--drift-ppm", type=float, nargs="+", default=None)
    p.add_argument("--delay-ms", type=float, default=0.5, help="one-way network delay to NTP")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--no-rtc", action="store_true", help="meters without DS3231 RTC (§4.10)")
    p.add_argument("--no-serial", action="store_true", help="do not open pseudo-terminals")
    p.add_argument("--control-port", type=int, default=None,
                   help="base port of the test control channel (meter i: P+i; 0 = ephemeral)")
    p.add_argument("--boot-delay", type=float, default=0.5, help="seconds a reboot takes")
    p.add_argument("--stream-server-port", type=int, default=54322)
    p.add_argument("--stream-server-period", type=float, default=30.0)
    p.add_argument("--grid-seed", type=int, default=0)
    p.add_argument("--no-truth", action="store_true",
                   help="do not keep produced samples for the control channel (saves memory)")
    p.add_argument("--log-level", default="WARNING", help="Python logging level (stderr)")
    return p


def configs_from_args(args: argparse.Namespace) -> list[EmulatorConfig]:
    n = args.count
    offsets = _per_meter(args.offset_ms, n, 0.0)
    drifts = _per_meter(args.drift_ppm, n, 0.0)
    configs = []
    for i in range(n):
        name = f"{args.name_prefix}{i:03d}"
        base = args.base_port
        configs.append(EmulatorConfig(
            name=name,
            host=args.host,
            command_port=base + 2 * i if base else 0,
            stream_port=base + 2 * i + 1 if base else 0,
            state_path=(args.state_dir / f"{name}.json") if args.state_dir else None,
            rtc=not args.no_rtc,
            clock_offset_s=offsets[i] / 1000,
            drift_ppm=drifts[i],
            network_delay_s=args.delay_ms / 1000,
            network_jitter_s=args.jitter_ms / 1000,
            time_server=args.time_server,
            ntp_port=args.ntp_port,
            boot_delay_s=args.boot_delay,
            grid_seed=args.grid_seed,
            circuit=i,
            noise_seed=i,
            seed=i,
            serial=not args.no_serial,
            control_port=(args.control_port + i if args.control_port else 0)
            if args.control_port is not None else None,
            keep_truth=not args.no_truth,
            stream_server_port=args.stream_server_port,
            stream_server_period_s=args.stream_server_period,
        ))
    return configs


async def run(configs: Sequence[EmulatorConfig]) -> None:
    meters = [EmulatedMeter(c) for c in configs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.gather(*(m.start() for m in meters))
        for m in meters:
            print(json.dumps(m.describe()), flush=True)
        await stop.wait()
    finally:
        await asyncio.gather(*(m.stop() for m in meters), return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(configs_from_args(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
