"""``smartmeter``: record, inspect and export SmartMeter runs from the shell.

Sub-commands (``smartmeter COMMAND --help`` for each)::

    smartmeter record [HOST…]           # the main job: no host = 2 emulated meters
    smartmeter discover                 # meters announcing _elec._tcp on the network (mDNS)
    smartmeter info|get|set HOST…       # a meter's info line and settings (--json)
    smartmeter read|ntp|logs HOST…      # readings, an NTP sync now, the log
    smartmeter emulate --count N [--mqtt HOST[:PORT]]  # emulated meters in the foreground
    smartmeter runs [RUN]               # runs in a catalog, or one run's summary
    smartmeter plot RUN                 # the PNGs of a run
    smartmeter export RUN --format csv|parquet|mkv [--power-summary csv|parquet]
    smartmeter rerun RUN                # repeat a run: same plan, arguments and settings
    smartmeter replay JOURNAL…          # write kept journals of runs into a catalog

Exit status: 0 success, 1 a meter/catalog/tool failed, 2 a usage mistake (nothing touched),
130 interrupted by Ctrl-C (the run closed with exit status ``abort``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailedError,
    HelpFormatter,
    Parser,
    UsageError,
    add_json_option,
    count_in,
    positive_float,
    print_json,
    say,
    table,
)

logger = logging.getLogger("smartmeter_ophyd.cli")


# -------------------------------------------------------------------------------- emulate


def cmd_emulate(args: argparse.Namespace) -> int:
    from ..emulator import EmulatorFleet

    common: dict[str, Any] = {"boot_delay_s": args.boot_delay, "mdns": args.mdns}
    if args.time_server is not None:
        common.update(time_server=args.time_server, ntp_port=args.ntp_port)
    if args.mqtt is not None:
        common.update(mqtt_server=args.mqtt[0], mqtt_port=args.mqtt[1])
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    meters = []
    for i in range(args.count):
        own: dict[str, Any] = {"name": f"{args.name_prefix}{i + 1}"}
        if args.base_port:
            own.update(command_port=args.base_port + 2 * i, stream_port=args.base_port + 2 * i + 1)
        if args.state_dir is not None:
            own["state_path"] = args.state_dir / f"{own['name']}.json"
        meters.append(own)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fleet = EmulatorFleet(meters, host=args.host, **common).start()
    except (OSError, RuntimeError, ValueError) as exc:
        raise CommandFailedError(f"smartmeter emulate: {exc}") from None
    try:
        described = fleet.call(lambda: [{**m.describe(), "mqtt_connected": m.mqtt.connected()}
                                        for m in fleet.meters])
        sntp = fleet.sntp_address
        for line in described:
            line["time_server"] = (f"{args.time_server}:{args.ntp_port}" if args.time_server
                                   else f"{sntp[0]}:{sntp[1]}")
            if args.mqtt is not None:
                line["mqtt"] = f"{args.mqtt[0]}:{args.mqtt[1]}"
            else:
                del line["mqtt_connected"]
            print_json_line(line)
        say(f"{args.count} emulated meter(s) running; SNTP responder on {sntp[0]}:{sntp[1]}; "
            "Ctrl-C stops them")
        if args.mqtt is not None:
            offline = [line["name"] for line in described if not line["mqtt_connected"]]
            say(f"MQTT broker {args.mqtt[0]}:{args.mqtt[1]}: "
                + (f"{', '.join(offline)} could not connect; retrying every second, as the "
                   "firmware does (§8.1)" if offline else "all meters connected"))
        stop.wait()
    finally:
        fleet.close()
    return EXIT_OK


def print_json_line(value: Any) -> None:
    import json

    print(json.dumps(value, default=str), flush=True)


# ------------------------------------------------------------------------------- discover


def cmd_discover(args: argparse.Namespace) -> int:
    """List meters announcing _elec._tcp by mDNS (§9); commands go to command_port."""
    from ..client import discover

    try:
        found = discover(args.timeout, interfaces=args.interface)
    except ImportError as exc:
        raise CommandFailedError(f"smartmeter discover: {exc}") from None
    except OSError as exc:
        raise CommandFailedError(f"smartmeter discover: mDNS failed: {exc}") from None
    rows = [{"name": m.name, "address": m.address, "command_port": m.command_port,
             "stream_port": m.port, "host": m.host, "addresses": list(m.addresses)}
            for m in found]
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print(f"no meter announced _elec._tcp within {args.timeout:g} s")
        return EXIT_OK
    print(table([[r["name"], f"{r['address']}:{r['command_port']}", r["host"]] for r in rows],
                ["name", "address (commands)", "mDNS host"]))
    return EXIT_OK


# --------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import _meters, _record, _replay, _runs

    parser = Parser(prog="smartmeter", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: this package's INFO log; -vv: DEBUG and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    def command(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
                ) -> argparse.ArgumentParser:
        doc = handler.__doc__ or help_text
        p = sub.add_parser(name, help=help_text, description=doc,
                           formatter_class=HelpFormatter)
        p.set_defaults(handler=handler)
        return p

    p = command("record", "record meters into a catalog (no host: emulated meters)",
                _record.cmd_record)
    p.description = _record.__doc__
    _record.add_record_options(p)

    p = command("discover", "list meters announcing _elec._tcp (mDNS)", cmd_discover)
    p.add_argument("--timeout", type=positive_float, default=3.0, help="seconds to listen")
    p.add_argument("--interface", action="append", default=None, metavar="IPV4",
                   help="address of an interface to browse on (repeatable; default: all)")
    add_json_option(p)

    p = command("info", "print meters' info line", _meters.cmd_info)
    _meters.add_address(p)
    add_json_option(p)
    p = command("get", "print meters' settings", _meters.cmd_get)
    _meters.add_address(p)
    p.add_argument("--setting", action="append", choices=_meters.setting_names(), default=None,
                   help="a setting to print (repeatable); default: all")
    add_json_option(p)
    p = command("set", "change meters' stored settings and show what changed", _meters.cmd_set)
    _meters.add_address(p)
    _meters.add_set_options(p)
    p = command("read", "print instantaneous readings", _meters.cmd_read)
    _meters.add_address(p)
    add_json_option(p)
    p = command("ntp", "synchronise meters' clocks now; print the confidence", _meters.cmd_ntp)
    _meters.add_address(p)
    add_json_option(p)
    p = command("logs", "follow a meter's log lines", _meters.cmd_logs)
    _meters.add_address(p, many=False)
    p.add_argument("--level", choices=["all", "debug", "info", "warning", "error"],
                   default="info", help="the meter's log level for this connection")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")

    p = command("emulate", "run emulated meters in the foreground until Ctrl-C", cmd_emulate)
    p.add_argument("--count", type=count_in(1, 64), default=1, help="number of meters")
    p.add_argument("--name-prefix", default="meter", help="meters are <prefix>1..N")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--base-port", type=int, default=0,
                   help="meter i listens on P+2i (commands) and P+2i+1 (stream); 0: any free")
    p.add_argument("--time-server", default=None,
                   help="NTP server for the meters; default: the emulators' own SNTP responder")
    p.add_argument("--ntp-port", type=int, default=123, help="port of --time-server")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="keep each meter's settings in <dir>/<name>.json across restarts")
    p.add_argument("--boot-delay", type=float, default=0.5, help="seconds a reboot takes")
    p.add_argument("--mdns", action="store_true",
                   help="announce each meter as _elec._tcp on --host, as the firmware does (§9)")
    p.add_argument("--mqtt", type=_broker_address, default=None, metavar="HOST[:PORT]",
                   help="MQTT broker the meters connect to (§8): status every 5 s, the "
                        "powermeter/<name>/cmd|state|sample topics, sampling over MQTT; "
                        f"PORT defaults to the firmware's {MQTT_PORT}; default: no broker")

    p = command("runs", "list runs in a catalog, or print one run's summary", _runs.cmd_runs)
    p.add_argument("run", metavar="RUN", nargs="?", default=None,
                   help="print this run's summary (uid, prefix or -1)")
    _runs.add_catalog_options(p)
    p.add_argument("--limit", type=int, default=20, help="show the latest N runs (0: all)")
    add_json_option(p)

    p = command("plot", "write the PNGs of a run", _runs.cmd_plot)
    _runs.add_run_argument(p)
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the PNGs go (default: <data-dir>/plots)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs")

    p = command("export", "export a run as CSV, Parquet or MKV (+ 1 Hz power summary)",
                _runs.cmd_export)
    _runs.add_run_argument(p)
    p.add_argument("--format", choices=["csv", "parquet", "mkv"], default=None,
                   help="samples: one file per meter")
    p.add_argument("--power-summary", choices=["csv", "parquet"], default=None,
                   help="also write a 1 Hz power summary per meter")
    p.add_argument("--output-dir", type=Path, default=Path("."), help="where the files go")
    p.add_argument("--meter", action="append", default=None,
                   help="export only this meter (repeatable); default: all")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")

    p = command("rerun", "repeat a recorded run (same plan, arguments, meter settings)",
                _runs.cmd_rerun)
    _runs.add_run_argument(p)
    p.add_argument("--host", action="append", default=[], metavar="NAME=HOST[:PORT]",
                   type=_named_address,
                   help="where meter NAME is now (default: where it was; emulated meters of "
                        "the original run are emulated again)")
    p.add_argument("--hdf5-dir", type=Path, default=None,
                   help="with --catalog: where meters write HDF5 (the server's readable storage)")
    p = command("replay", "write kept journals of runs into a catalog", _replay.cmd_replay)
    p.description = _replay.__doc__
    _replay.add_replay_options(p)
    return parser


MQTT_PORT = 1883
"""The broker port the firmware always dials (§8.1)."""


def _broker_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(MQTT_PORT)
    if not host:
        raise argparse.ArgumentTypeError(f"no host in {text!r}; expected HOST[:PORT]")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"port {port!r} in {text!r} is not a number; expected HOST[:PORT]") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port {number} in {text!r} is not 1..65535")
    return host, number


def _named_address(text: str) -> Any:
    from ._common import meter_address

    address = meter_address(text)
    if address.name is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=HOST[:PORT]")
    return address


# ----------------------------------------------------------------------------------- main


def _logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        # the RunEngine logs every failed or aborted run with a traceback; we say it in a line
        logging.getLogger("bluesky").setLevel(logging.CRITICAL)
    if verbose:
        logging.getLogger("smartmeter_ophyd").setLevel(logging.DEBUG if verbose > 1
                                                       else logging.INFO)
        logging.getLogger("plans").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = args.verbose
        _logging(verbose)
        return int(args.handler(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `smartmeter info HOST | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_OK
    except Exception as exc:
        if verbose > 1:
            raise
        from ..client import MeterError

        kind = "" if isinstance(exc, MeterError | OSError) else f"{type(exc).__name__}: "
        print(f"error: {kind}{exc} (-vv shows the traceback)", file=sys.stderr)
        return EXIT_FAILED


def run() -> NoReturn:
    """The ``smartmeter`` program: :func:`main`, then exit.

    Everything the command opened is closed when :func:`main` returns; what is left are the
    modules' objects (Tiled's, dask's, pandas'...), which the interpreter's final garbage
    collections would walk for about a second.  Frozen, they are skipped (the operating
    system frees the memory); atexit handlers still run.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
