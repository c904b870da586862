"""What reading a recorded run back costs: the CLI's summary and plots against databroker's reads.

N emulated meters (child processes, as ``fleet.py``) are flown for ``--seconds`` in one
``plans.synchronized_fly`` into the embedded catalog.  Then, on a freshly fetched run client
each time (nothing kept between the two), this process times and counts the HTTP requests of:

* **baseline**: what a user's first look through databroker costs: every meter's stream
  read whole (``run[meter].read()``) and the three per-run tables
  (``run[table].read()``: ``meter_summary``, ``synchronization``, ``alignment``);
* **ours**: what ``smartmeter record`` prints and draws at the end of a run: the summary
  (``cli._summary.run_summary``) and both PNGs (``plotting.plot_run``), through
  ``smartmeter_ophyd.readback`` (one search per meter, the samples from the HDF5 files the
  catalog references), then every meter whole (``readback.meter_data``).

Each request to the embedded catalog costs tens of milliseconds in-process (FastAPI rebuilds
every route dependency per request while any dependency override is set, and Tiled sets one),
so the count is what matters; a remote server adds its round trip to each.

Last line: ``summary and plots of N meters: X s in R requests (databroker's reads: Y s in Q
requests)``.

Usage: ``python benchmarks/readback.py --meters 4 --seconds 5``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _harness import Emulators, destroyed, host_load, smartmeters
from bluesky import RunEngine

import plans
from smartmeter_ophyd.cli._summary import run_summary
from smartmeter_ophyd.plotting import plot_run
from smartmeter_ophyd.readback import meter_data, run_meters
from smartmeter_ophyd.storage import open_catalog, setup_embedded_catalog

TABLES = ("meter_summary", "synchronization", "alignment")


def timed(client: Any, uid: str, work: Callable[[Any], object]) -> tuple[float, int]:
    """Seconds and HTTP requests of ``work(run)`` on a freshly fetched run client."""
    run = client[uid]
    sent: list[str] = []

    def count(request: Any) -> None:
        sent.append(request.url.path)

    hooks = run.context.http_client.event_hooks["request"]
    hooks.append(count)
    try:
        t0 = time.perf_counter()
        work(run)
        return time.perf_counter() - t0, len(sent)
    finally:
        hooks.remove(count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-readback-"))
    catalog = setup_embedded_catalog(work / "catalog", "smartmeter-readback",
                                     profiles_dir=work / "profiles")
    try:
        with Emulators(args.meters) as emulators:
            meters = smartmeters(emulators.described, catalog)
            with destroyed(meters):
                engine = RunEngine({})
                engine.subscribe(catalog.document_sink())
                (uid,) = engine(plans.synchronized_fly(meters, args.seconds))
        client = open_catalog(catalog.profile)
        print(f"host: {host_load()}; {args.meters} meters x 8 kHz x 6 channels, "
              f"{args.seconds:g} s")

        def databroker_reads(run: Any) -> None:
            for meter in run_meters(run):
                run[meter].read()
            for table in TABLES:
                run[table].read()

        def summary_and_plots(run: Any) -> None:
            run_summary(run)
            plot_run(run, work / "plots", overwrite=True)

        def every_meter(run: Any) -> None:
            for meter in run_meters(run):
                meter_data(run, meter)

        timed(client, uid, summary_and_plots)  # imports and first draws are not the subject
        base_s, base_n = timed(client, uid, databroker_reads)
        ours_s, ours_n = timed(client, uid, summary_and_plots)
        whole_s, whole_n = timed(client, uid, every_meter)
        print(f"baseline, databroker: every meter's stream and the 3 tables read: "
              f"{base_s:.2f} s, {base_n} requests")
        print(f"readback.meter_data of every meter, whole: {whole_s:.2f} s, {whole_n} requests")
        print(f"summary and plots of {args.meters} meters: {ours_s:.2f} s in {ours_n} requests "
              f"(databroker's reads: {base_s:.2f} s in {base_n} requests)")
        client.context.close()
    finally:
        catalog.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
