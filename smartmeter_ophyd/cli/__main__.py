"""``smartmeter``: talk to a SmartMeter (real or emulated) from the shell.

A thin layer over :class:`smartmeter_ophyd.client.MeterClient` and the HDF5 writer; every
command works unchanged against a real meter.  Sub-commands::

    smartmeter info HOST[:PORT]                 # the info message, as JSON
    smartmeter read HOST[:PORT]                 # RMS voltage/current, power, frequency, ...
    smartmeter set HOST[:PORT] --name lab-1 --time-server 10.0.0.1 ...
    smartmeter ntp HOST[:PORT]                  # sync now; prints the confidence
    smartmeter logs HOST[:PORT] [--level debug] # follow log lines until Ctrl-C
    smartmeter record HOST[:PORT] -o run.h5 --seconds 5 --rate 8000 [--measures v,i_L1]
    smartmeter emulate [emulator options]       # same as python -m smartmeter_ophyd.emulator

Exit status: 0 on success, 1 when the meter refused or failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..client import MeterClient, MeterError
from ..protocol import LogLevel, LogLine, Measures, Transport

logger = logging.getLogger("smartmeter_ophyd.cli")

DEFAULT_PORT = 54321


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, DEFAULT_PORT
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST[:PORT]: {text!r}") from None


def _measures(text: str) -> Measures:
    for mode in Measures:
        if text in (mode.name, mode.value) or text in mode.spec.accepted_inputs:
            return mode
    allowed = ", ".join(m.value for m in Measures)
    raise argparse.ArgumentTypeError(f"unknown measures {text!r}; allowed: {allowed}")


def _connect(args: argparse.Namespace) -> MeterClient:
    host, port = args.address
    return MeterClient(host, port, timeout=args.timeout, reconnect=False)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.value
    return value


def cmd_info(args: argparse.Namespace) -> int:
    with _connect(args) as meter:
        info = meter.get_info()
    print(json.dumps(info.raw_fields, indent=2))
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    with _connect(args) as meter:
        voltage = meter.get_voltage()
        current = meter.get_current()
        power = meter.get_power()
        frequency = meter.get_frequency()
        angle = meter.get_phase_angle()
    rows = [
        ("voltage", voltage.values, voltage.unit),
        ("current", current.values, current.unit),
        ("active power", power.active, "W"),
        ("reactive power", power.reactive, "var"),
        ("frequency", frequency.values, frequency.unit),
        ("phase angle", angle.values, angle.unit),
    ]
    for label, values, unit in rows:
        print(f"{label:>15}: " + "  ".join(f"{v:10.3f}" for v in values) + f"  {unit}")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    changes = [
        ("name", args.name, "set_name"),
        ("time server", args.time_server, "set_time_server"),
        ("mqtt server", args.mqtt_server, "set_mqtt_server"),
        ("stream server", args.stream_server, "set_stream_server"),
        ("calibration", args.calibration, "set_calibration"),
    ]
    wanted = [(label, value, method) for label, value, method in changes if value is not None]
    if not wanted and args.daily_restart is None:
        print("nothing to set (see --help)", file=sys.stderr)
        return 2
    with _connect(args) as meter:
        for label, value, method in wanted:
            reply = getattr(meter, method)(value)
            print(f"{label}: {getattr(reply, 'message', '') or 'ok'}")
        if args.daily_restart is not None:
            hour, minute = args.daily_restart
            reply = meter.set_daily_restart(hour, minute)
            print(f"daily restart: {getattr(reply, 'message', '') or 'ok'}")
    return 0


def cmd_ntp(args: argparse.Namespace) -> int:
    confidence: list[str] = []

    def on_log(line: LogLine) -> None:
        if line.text.startswith("NTP synced with conf:"):
            confidence.append(line.text.rsplit(":", 1)[1].strip())

    with _connect(args) as meter:
        meter.subscribe_logs(on_log)
        reply = meter.ntp_sync()
    ok = reply.succeeded
    print(f"{reply.message}; meter time {reply.current_time}"
          + (f"; confidence {confidence[-1]} ms" if confidence else ""))
    return 0 if ok else 1


def cmd_logs(args: argparse.Namespace) -> int:
    done = threading.Event()

    def on_log(line: LogLine) -> None:
        print(f"[{line.level.tag}] {line.device_time}: {line.text}", flush=True)

    with _connect(args) as meter:
        meter.set_log_level(args.level)
        meter.subscribe_logs(on_log)
        try:
            done.wait(args.seconds if args.seconds > 0 else None)
        except KeyboardInterrupt:
            pass
    return 0


def _store(writer: Any, block: Any) -> None:
    for gap in block.gaps:  # declared missing, never filled
        if (span := gap.missing_packets) is not None:
            writer.record_gap(*span, gap.missing_samples)
    writer.append(block.values, block.packets, block.frame_samples)


def cmd_record(args: argparse.Namespace) -> int:
    from ..storage import WaveformWriter  # h5py only when recording

    transport = Transport(args.transport)
    target = int(args.seconds * args.rate)
    with _connect(args) as meter:
        info = meter.info
        session = meter.sample(rate=args.rate, measures=args.measures, transport=transport)
        reply = session.session.reply
        start_ts = reply.start_ts if reply.start_ts else time.time()
        metadata = {"name": info.name if info else "", "host": args.address[0],
                    "firmware": info.version if info else "",
                    "compiled": info.compiled if info else "",
                    "sampling_reply": reply.raw_fields}
        with WaveformWriter(args.output, reply.measures, args.rate, start_ts, metadata) as writer:
            for block in session:
                _store(writer, block)
                if writer.samples_appended >= target:
                    break
            summary = session.stop()
            for block in session:  # frames flushed by stop (§4.8): recorded, not dropped
                _store(writer, block)
            writer.close(stop_summary=_jsonable(summary))
    print(f"{args.output}: {writer.samples_written} samples of {', '.join(reply.measures.channels)}"
          f" at {args.rate} Hz; meter reported {summary.device_samples} sampled,"
          f" {summary.missing_declared} declared missing"
          + ("" if summary.explained else "; UNEXPLAINED difference, see the file's attributes"))
    return 0 if summary.explained else 1


def cmd_emulate(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from ..emulator.__main__ import main as emulator_main

    return emulator_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartmeter", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_address(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("address", type=_address, help="HOST[:PORT] (port 54321 by default)")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds per command")
        return p

    with_address("info", "print the info message")
    with_address("read", "print instantaneous readings")
    p = with_address("set", "change stored settings")
    p.add_argument("--name")
    p.add_argument("--time-server")
    p.add_argument("--mqtt-server")
    p.add_argument("--stream-server")
    p.add_argument("--calibration", type=float, nargs=6, metavar="F")
    p.add_argument("--daily-restart", type=int, nargs=2, metavar=("HOUR", "MINUTE"))
    with_address("ntp", "synchronise the meter's clock now")
    p = with_address("logs", "follow log lines")
    p.add_argument("--level", choices=[lv.wire_name for lv in LogLevel], default="info")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = Ctrl-C)")
    p = with_address("record", "record samples into an HDF5 file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=8000)
    p.add_argument("--measures", type=_measures, default=Measures.VI)
    p.add_argument("--transport", choices=["TCP", "UDP"], default="TCP")
    sub.add_parser("emulate", help="run emulated meters (options: smartmeter emulate --help)",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["emulate"]:
        return cmd_emulate(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    handler = {"info": cmd_info, "read": cmd_read, "set": cmd_set, "ntp": cmd_ntp,
               "logs": cmd_logs, "record": cmd_record}[args.command]
    try:
        return handler(args)
    except BrokenPipeError:  # e.g. `smartmeter info HOST | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MeterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
