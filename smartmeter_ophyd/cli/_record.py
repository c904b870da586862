"""``smartmeter record``: the main job.

``plans.synchronized_fly`` through a RunEngine into a catalog (the embedded one under
``--data-dir`` unless ``--catalog`` names another), with one progress bar per meter, a
summary table and two PNGs at the end.  With no host it starts ``--emulate N`` emulated
meters and their SNTP responder (:class:`~smartmeter_ophyd.emulator.EmulatorFleet`).

Order of work, so that mistakes cost nothing: every argument is checked (the CLI's own
checks, then the plan's own validation on devices that have done no I/O) before any
emulator starts or any meter is contacted.

Ctrl-C: the first one aborts the run (``RE.abort``): the plan stops every meter, records
what they sent, and the run closes with exit status ``abort``; the summary is printed and
the command exits with status 130.  Further Ctrl-Cs while stopping are ignored (said so).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Catalog,
    CommandFailedError,
    MeterAddress,
    UsageError,
    add_catalog_options,
    add_json_option,
    check_writable_dir,
    count_in,
    meter_address,
    open_catalog,
    positive_float,
    print_json,
    say,
    wait_in_catalog,
)
from ._progress import MeterProgress

UNTIL_STOPPED_S: Final = 7 * 24 * 3600.0
"""``--until-stopped`` records for at most a week (the plan needs a finite duration)."""
MAX_EMULATED: Final = 16


def add_record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("meters", metavar="[NAME=]HOST[:PORT]", nargs="*", type=meter_address,
                   help="meters to record; none: start --emulate emulated meters")
    p.add_argument("--emulate", type=count_in(1, MAX_EMULATED), default=None, metavar="N",
                   help="emulated meters to start when no host is given (default 2)")
    p.add_argument("--name-prefix", default="meter",
                   help="emulated meters are <prefix>1..N; hosts without NAME= likewise")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--duration", type=positive_float, default=10.0, metavar="SECONDS",
                        help="seconds of samples per meter")
    length.add_argument("--until-stopped", action="store_true",
                        help="record until Ctrl-C (at most a week)")
    p.add_argument("--rate", type=int, default=8000,
                   help="sampling rate in Hz (a divisor of 32000, §4.3)")
    p.add_argument("--measures", default="v,i,v,i,v,i",
                   help="what each sample holds (§4.2): v,i,v,i,v,i  v,i_L1  v,i_L2  v,i_L3  "
                        "p,q  v,i_RMS")
    p.add_argument("--transport", choices=["TCP", "UDP"], default="TCP",
                   help="how samples travel")
    p.add_argument("--flow-control", choices=["none", "cts", "reqSamples"], default="none",
                   help="none: free streaming; cts: start paused, released together; "
                        "reqSamples: the host pulls (§5)")
    p.add_argument("--ntp-confidence-ms", type=positive_float, default=5.0,
                   help="NTP gate: each meter's sync confidence must reach this before the start")
    p.add_argument("--ntp-attempts", type=count_in(1, 100), default=3,
                   help="NTP gate: syncs tried per meter")
    p.add_argument("--start-in", type=float, default=None, metavar="SECONDS",
                   help="common start this far ahead (0.5..20); 0: each meter starts at once; "
                        "default: the earliest safe instant (§6.4)")
    add_catalog_options(p)
    p.add_argument("--hdf5-dir", type=Path, default=None,
                   help="with --catalog: where meters write HDF5 (the server's readable storage)")
    p.add_argument("--plots-dir", type=Path, default=None,
                   help="where the PNGs go (default: <data-dir>/plots)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNGs")
    p.add_argument("--timeout", type=positive_float, default=5.0,
                   help="seconds per meter command")
    add_json_option(p)


# ------------------------------------------------------------------------------- checks


def _names(args: argparse.Namespace) -> list[MeterAddress]:
    if args.meters:
        if args.emulate is not None:
            raise UsageError("smartmeter record: --emulate starts emulated meters; "
                             "give hosts or --emulate, not both")
        named = [MeterAddress(a.host, a.port, a.name or f"{args.name_prefix}{i + 1}")
                 for i, a in enumerate(args.meters)]
    else:
        count = args.emulate if args.emulate is not None else 2
        named = [MeterAddress("127.0.0.1", 1, f"{args.name_prefix}{i + 1}")
                 for i in range(count)]
    seen = [a.name for a in named]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise UsageError(f"smartmeter record: meter name(s) {duplicates} given twice")
    return named


def _plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "rate": args.rate,
        "measures": args.measures,
        "transport": args.transport,
        "flow_control": None if args.flow_control == "none" else args.flow_control,
        "ntp_confidence_ms": args.ntp_confidence_ms,
        "ntp_attempts": args.ntp_attempts,
        "start_in": args.start_in,
    }


def _duration(args: argparse.Namespace) -> float:
    return UNTIL_STOPPED_S if args.until_stopped else float(args.duration)


def validate_plan(names: Sequence[MeterAddress], args: argparse.Namespace,
                  data_dir: Path) -> None:
    """Run the plan's own argument checks on devices that have done no I/O."""
    from plans import PlanArgumentError, synchronized_fly

    from ..devices import SmartMeter

    devices = [SmartMeter(a.host, a.port, name=str(a.name), data_directory=data_dir)
               for a in names]
    gen = synchronized_fly(devices, _duration(args), **_plan_kwargs(args))
    try:
        next(gen)  # the checks run before the first message; nothing is executed here
    except PlanArgumentError as exc:
        message = _plan_message(exc)
        for a in names:  # the placeholder address of a meter not started yet says nothing
            message = message.replace(f"smartmeter {a.name} ({a.host}:{a.port})", str(a.name))
        raise UsageError(f"smartmeter record: {message}") from None
    finally:
        with contextlib.suppress(Exception):
            gen.close()
        for device in devices:
            device.destroy()


def _plan_message(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("synchronized_fly: ") else text


# ------------------------------------------------------------------------------- Ctrl-C


class AbortOnInterrupt:
    """SIGINT -> ``RE.abort("Ctrl-C")`` once, from a helper thread; later ones are noted."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requested = threading.Event()
        self._previous: Any = None

    def _handler(self, _signum: int, _frame: Any) -> None:
        if self.requested.is_set():
            print("\nstill stopping the meters; please wait", file=sys.stderr, flush=True)
            return
        self.requested.set()
        # the plan logs the abort as its failure ("failed: RequestAbort"): not news here
        logging.getLogger("plans").setLevel(logging.CRITICAL)
        print("\nCtrl-C: stopping the meters and closing the run (exit status abort) ...",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._abort, name="smartmeter abort", daemon=True).start()

    def _abort(self) -> None:
        with contextlib.suppress(Exception):  # already idle: the plan ended by itself
            self.engine.abort("interrupted by Ctrl-C")

    def __enter__(self) -> AbortOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------------- job


@contextlib.contextmanager
def _meters(names: Sequence[MeterAddress], emulated: bool, catalog: Catalog,
            timeout: float) -> Iterator[tuple[list[Any], Any]]:
    from ..devices import SmartMeter

    fleet = None
    if emulated:
        say(f"starting {len(names)} emulated meters and their SNTP time server ...")
        fleet = _fleet(names)
        addresses = fleet.addresses
    else:
        addresses = [(a.host, a.port) for a in names]
    assert catalog.data_directory is not None
    devices = [SmartMeter(host, port, name=str(a.name), data_directory=catalog.data_directory,
                          readable_root=catalog.readable or None, timeout=timeout,
                          emulated=emulated)
               for a, (host, port) in zip(names, addresses, strict=True)]
    try:
        yield devices, fleet
    finally:
        for device in devices:
            with contextlib.suppress(Exception):
                device.destroy()
        if fleet is not None:
            fleet.close()


def _fleet(names: Sequence[MeterAddress]) -> Any:
    from ..emulator import EmulatorFleet

    fleet = EmulatorFleet([{"name": str(a.name)} for a in names])
    return fleet.start()


def cmd_record(args: argparse.Namespace) -> int:
    from ..quiet import quiet_tiled

    names = _names(args)
    emulated = not args.meters
    if args.catalog is not None and args.hdf5_dir is None:
        raise UsageError("smartmeter record: --catalog needs --hdf5-dir (a directory the "
                         "catalog's server can read, where the meters write their HDF5 files)")
    check_writable_dir(args.data_dir, "--data-dir")
    plots = args.plots_dir or args.data_dir / "plots"
    if not args.no_plots:
        check_writable_dir(plots, "--plots-dir")
    hdf5 = args.hdf5_dir.resolve() if args.hdf5_dir is not None else args.data_dir / "catalog" / "hdf5"
    validate_plan(names, args, hdf5)
    quiet_tiled()

    t_start = time.monotonic()
    catalog = open_catalog(args, create=True, hdf5_dir=args.hdf5_dir)
    try:
        catalog.document_sink()  # its writer process imports Tiled while the meters start
        with _meters(names, emulated, catalog, args.timeout) as (devices, _fleet_):
            uid, status = _run(devices, args, catalog)
        if uid is None:
            say("the run never opened; nothing was recorded")
            return EXIT_INTERRUPTED if status == "abort" else EXIT_FAILED
        return _report(catalog, uid, status, args, plots, t_start)
    finally:
        catalog.close()


def _run(devices: list[Any], args: argparse.Namespace, catalog: Catalog
         ) -> tuple[str | None, str]:
    """Fly; returns ``(run uid or None, "success" | "abort" | "fail")``."""
    from bluesky import RunEngine
    from bluesky.utils import RunEngineInterrupted

    from plans import NtpGateError, PlanArgumentError, synchronized_fly

    from ..client import MeterError

    engine = RunEngine({}, context_managers=[])
    engine.subscribe(catalog.document_sink())
    uids: list[str] = []
    engine.subscribe(lambda _name, doc: uids.append(doc["uid"]), "start")
    mode = "until Ctrl-C" if args.until_stopped else f"for {args.duration:g} s"

    def announce(_names: list[str]) -> None:
        say(f"recording {len(devices)} meter(s) at {args.rate} Hz {mode} "
            "(Ctrl-C stops and keeps what was recorded)")

    progress = MeterProgress(on_first=announce, show_target=not args.until_stopped)
    engine.waiting_hook = progress
    plan = synchronized_fly(devices, _duration(args), **_plan_kwargs(args),
                            md={"purpose": "smartmeter record"})
    say(f"connecting to {len(devices)} meter(s) and checking their NTP time "
        f"(gate: {args.ntp_confidence_ms:g} ms) ...")
    interrupt = AbortOnInterrupt(engine)
    status = "success"
    try:
        # bluesky prints "Aborting: ..." on stdout; stdout is for the summary
        with interrupt, contextlib.redirect_stdout(sys.stderr):
            engine(plan)
    except RunEngineInterrupted:
        status = "abort"
    except PlanArgumentError as exc:
        raise UsageError(f"smartmeter record: {_plan_message(exc)}") from None
    except NtpGateError as exc:
        progress.close()
        raise CommandFailedError(_ntp_advice(exc, devices)) from None
    except MeterError as exc:
        status = "fail"
        progress.close()
        say(f"error: {exc}")
    except Exception as exc:
        if interrupt.requested.is_set():
            status = "abort"
        else:
            status = "fail"
            progress.close()
            say(f"error: {exc}")
    finally:
        progress.close()
    if interrupt.requested.is_set():
        status = "abort"
    return (uids[0] if uids else None), status


def _ntp_advice(exc: Exception, devices: Sequence[Any]) -> str:
    hosts = " ".join(f"{d.host}:{d.port}" for d in devices)
    return (f"{exc}\nThe meters must sync their clocks before a synchronized recording. "
            f"Point them at a time server they can reach (smartmeter set {hosts} --time-server "
            "NTP_HOST), check it with `smartmeter ntp HOST`, or relax --ntp-confidence-ms")


def _report(catalog: Catalog, uid: str, status: str, args: argparse.Namespace, plots: Path,
            t_start: float) -> int:
    from ._summary import format_summary, run_summary

    run = wait_in_catalog(catalog, uid)
    summary = run_summary(run)
    pngs: list[Path] = []
    if not args.no_plots:
        from ..plotting import PlotError, plot_run

        try:
            pngs = plot_run(run, plots)
        except (PlotError, ValueError) as exc:
            say(f"no plots: {exc}")
    if args.json:
        summary["plots"] = [str(p) for p in pngs]
        print_json(summary)
    else:
        print(format_summary(summary))
        for png in pngs:
            print(f"plot: {png}")
        print(f"stored in the {catalog.description}")
        if catalog.embedded is not None:
            print(f"next: `smartmeter plot {uid[:8]}`, `smartmeter export {uid[:8]} --format "
                  f"mkv`; in Python: databroker.from_profile('{catalog.embedded.profile}')"
                  f"['{uid[:8]}']")
    say(f"done in {time.monotonic() - t_start:.1f} s")
    if status == "abort":
        return EXIT_INTERRUPTED
    if summary["exit_status"] != "success" or status == "fail":
        return EXIT_FAILED
    return EXIT_OK if all(r["explained"] for r in summary["meters"].values()) else EXIT_FAILED
