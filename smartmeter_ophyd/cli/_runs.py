"""``smartmeter runs|plot|export|rerun``: what is in a catalog, and doing things with a run.

``RUN`` is a run's uid, a prefix of it (at least 4 characters) or a negative index
(``-1`` is the latest run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailedError,
    UsageError,
    add_catalog_options,
    check_writable_dir,
    find_run,
    open_catalog,
    print_json,
    say,
    table,
    wait_in_catalog,
)


def add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="uid, uid prefix (4+ characters) or -1 (latest)")
    add_catalog_options(p)


def _when(t: float | None) -> str:
    if not t:
        return "?"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------------------------ runs


def cmd_runs(args: argparse.Namespace) -> int:
    from ._summary import format_summary, run_summary

    catalog = open_catalog(args, create=False)
    try:
        if args.run is not None:
            summary = run_summary(find_run(catalog.client, args.run))
            if args.json:
                print_json(summary)
            else:
                print(format_summary(summary))
            return EXIT_OK
        rows = []
        runs = list(catalog.client.values())[-args.limit:] if args.limit else list(
            catalog.client.values())
        for run in runs:
            start, stop = run.start, run.stop or {}
            meters = start.get("detectors", [])
            emulated = any((start.get("meters", {}).get(m) or {}).get("emulated") for m in meters)
            duration = (stop.get("time", 0) - start.get("time", 0)) if stop else None
            rows.append({
                "uid": start["uid"], "time": start.get("time"), "plan": start.get("plan_name"),
                "meters": meters, "emulated": emulated,
                "seconds": round(duration, 1) if duration is not None else None,
                "exit_status": stop.get("exit_status", "open"),
                "rerun_of": start.get("rerun_of"),
            })
        if args.json:
            print_json(rows)
            return EXIT_OK
        if not rows:
            print(f"no runs in the {catalog.description}")
            return EXIT_OK
        print(table([[r["uid"][:8], _when(r["time"]), str(r["plan"]),
                      ",".join(r["meters"]) + (" (emulated)" if r["emulated"] else ""),
                      "-" if r["seconds"] is None else f"{r['seconds']:g}", r["exit_status"]]
                     for r in rows],
                    ["uid", "start (UTC)", "plan", "meters", "seconds", "exit status"]))
    finally:
        catalog.close()
    return EXIT_OK


# ------------------------------------------------------------------------------------ plot


def cmd_plot(args: argparse.Namespace) -> int:
    from ..plotting import PlotError, plot_run, run_png_paths

    out = args.output_dir or args.data_dir / "plots"
    check_writable_dir(out, "--output-dir")
    if not args.overwrite and len(args.run) >= 8 and not args.run.startswith("-"):
        # the PNGs are named by the uid's first 8 characters: with those given, existing
        # files are refused before the catalog (and Tiled) is opened
        named = SimpleNamespace(start={"uid": args.run})
        existing = [str(p) for p in run_png_paths(named, out) if p.exists()]
        if existing:
            raise UsageError(f"smartmeter plot: {', '.join(existing)} already exist(s); "
                             "--overwrite replaces them")
    catalog = open_catalog(args, create=False)
    try:
        run = find_run(catalog.client, args.run)
        try:
            paths = plot_run(run, out, overwrite=args.overwrite)
        except FileExistsError as exc:
            raise UsageError(f"smartmeter plot: {exc}") from None
        except PlotError as exc:
            raise CommandFailedError(f"smartmeter plot: {exc}") from None
    finally:
        catalog.close()
    for path in paths:
        print(f"plot: {path}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import ExportError, export_paths, export_power_summary, export_run

    if args.format is None and args.power_summary is None:
        raise UsageError("smartmeter export: give --format and/or --power-summary")
    out: Path = args.output_dir
    check_writable_dir(out, "--output-dir")
    catalog = open_catalog(args, create=False)
    written: list[Path] = []
    notes: list[str] = []
    try:
        run = find_run(catalog.client, args.run)
        try:
            planned = []
            if args.format is not None:
                planned += list(export_paths(run, out, args.format, args.meter).values())
            if args.power_summary is not None:
                planned += list(export_paths(run, out, args.power_summary, args.meter,
                                             suffix="-power-1s").values())
            existing = [str(p) for p in planned if p.exists()]
            if existing and not args.overwrite:
                raise UsageError(f"smartmeter export: {', '.join(existing)} already exist(s); "
                                 "--overwrite replaces them")
            t0 = time.monotonic()
            if args.format is not None:
                result = export_run(run, out, args.format, meters=args.meter,
                                    overwrite=args.overwrite)
                written += result.paths
                notes += result.notes
            if args.power_summary is not None:
                written += export_power_summary(run, out, args.power_summary, meters=args.meter,
                                                overwrite=args.overwrite).paths
        except ExportError as exc:
            raise CommandFailedError(f"smartmeter export: {exc}") from None
    finally:
        catalog.close()
    for path in written:
        print(f"wrote {path}")
    for note in notes:
        print(f"note: {note}")
    say(f"exported in {time.monotonic() - t0:.1f} s")
    return EXIT_OK


# ----------------------------------------------------------------------------------- rerun


def cmd_rerun(args: argparse.Namespace) -> int:
    """Repeat a run: same plan, same arguments, meter settings restored (``plans.rerun``)."""
    from bluesky import RunEngine
    from bluesky.utils import RunEngineInterrupted

    from plans import NtpGateError, PlanArgumentError, rerun

    from ..client import MeterError
    from ..devices import SmartMeter
    from ._record import AbortOnInterrupt, _fleet
    from ._summary import format_summary, run_summary

    hosts = {a.name: a for a in args.host}
    catalog = open_catalog(args, create=False, hdf5_dir=args.hdf5_dir)
    fleet = None
    devices: list[Any] = []
    try:
        original = find_run(catalog.client, args.run)
        catalog.document_sink()  # its writer process imports Tiled while the meters start
        recorded: dict[str, Any] = original.start.get("meters") or {}
        names = list(recorded) or list(original.start.get("detectors", []))
        unknown = sorted(set(hosts) - set(names))
        if unknown:
            raise UsageError(f"smartmeter rerun: --host names {unknown} are not meters of run "
                             f"{original.start['uid'][:8]} (its meters: {names})")
        emulated = [n for n in names if (recorded.get(n) or {}).get("emulated") and n not in hosts]
        from ._common import MeterAddress

        if emulated:
            say(f"starting emulated meters {emulated} (the original run's were emulated) ...")
            fleet = _fleet([MeterAddress("127.0.0.1", 1, n) for n in emulated])
        addresses = dict(zip(emulated, fleet.addresses, strict=True)) if fleet else {}
        for n in names:
            if n in hosts:
                addresses[n] = (hosts[n].host, hosts[n].port)
            elif n not in addresses:
                meta = recorded.get(n) or {}
                if not meta.get("host"):
                    raise UsageError(f"smartmeter rerun: run does not record where {n} was; "
                                     f"give --host {n}=HOST[:PORT]")
                addresses[n] = (meta["host"], int(meta.get("port", 54321)))
        if catalog.data_directory is None:
            raise UsageError("smartmeter rerun: --catalog needs --hdf5-dir")
        devices = [SmartMeter(addresses[n][0], addresses[n][1], name=n,
                              data_directory=catalog.data_directory,
                              readable_root=catalog.readable or None,
                              emulated=n in emulated)
                   for n in names]
        engine = RunEngine({}, context_managers=[])
        engine.subscribe(catalog.document_sink())
        uids: list[str] = []
        engine.subscribe(lambda _n, doc: uids.append(doc["uid"]), "start")
        say(f"repeating run {original.start['uid'][:8]} ({original.start.get('plan_name')}) "
            f"with {', '.join(names)} ...")
        interrupt = AbortOnInterrupt(engine)
        try:
            with interrupt, contextlib.redirect_stdout(sys.stderr):
                engine(rerun(original.start["uid"], devices, catalog=catalog.client))
        except RunEngineInterrupted:
            pass
        except PlanArgumentError as exc:
            raise UsageError(f"smartmeter rerun: {exc}") from None
        except (NtpGateError, MeterError) as exc:
            raise CommandFailedError(f"smartmeter rerun: {exc}") from None
        if not uids:
            say("the new run never opened; nothing was recorded")
            return EXIT_FAILED
        summary = run_summary(wait_in_catalog(catalog, uids[0]))
        print(format_summary(summary))
        print(f"rerun of {original.start['uid']}")
        return EXIT_OK if summary["exit_status"] == "success" else EXIT_FAILED
    finally:
        for device in devices:
            device.destroy()
        if fleet is not None:
            fleet.close()
        catalog.close()
