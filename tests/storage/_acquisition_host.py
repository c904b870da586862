"""One "acquisition host" of the multi-host test, run as its own process.

Its own emulated meters (an ``EmulatorFleet`` in this process, timed by the real chrony), its
own RunEngine, one ``synchronized_fly`` written to a Tiled server with ``make_tiled_writer``
(synchronous HTTP) or, with ``--sink``, a ``JournalSink.for_server`` (journal here, HTTP from
a writer process).
It prints ``ready`` once everything is connected, waits for the file ``--go`` to exist (so
two hosts fly at the same time), flies, saves each meter's ground truth (the exact float32
rows the emulated meter sent) as ``<out>/<meter>.npy``, and prints one JSON line:
``{"uid": ..., "meters": [...], "start": t0, "stop": t1}``.

    python -m tests.storage._acquisition_host --uri U --api-key K --data-dir D \
        --ntp HOST:PORT --name hostA --out OUT --go GOFILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from bluesky import RunEngine

import plans
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.storage import JournalSink, connect_server, make_tiled_writer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ntp", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--go", required=True)
    parser.add_argument("--meters", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--sink", action="store_true", help="journal + writer process")
    args = parser.parse_args()
    ntp_host, ntp_port = args.ntp.rsplit(":", 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with EmulatorFleet(args.meters, name_prefix=f"{args.name}-", time_server=ntp_host,
                       ntp_port=int(ntp_port)) as fleet:
        meters = [
            SmartMeter(host, port, name=f"{args.name}_m{i}", data_directory=args.data_dir,
                       timeout=5.0)
            for i, (host, port) in enumerate(fleet.addresses)
        ]
        try:
            for meter in meters:
                meter.connect()
            engine = RunEngine({})
            sink = None
            if args.sink:
                sink = JournalSink.for_server(args.uri, args.api_key, out / "journal")
                engine.subscribe(sink)
                if not sink.wait_ready(120):
                    raise SystemExit(f"the writer did not start, see {sink.writer_log}")
            else:
                engine.subscribe(make_tiled_writer(connect_server(args.uri, args.api_key)))
            print("ready", flush=True)
            deadline = time.monotonic() + 120
            while not Path(args.go).exists():
                if time.monotonic() > deadline:
                    raise SystemExit("no go signal within 120 s")
                time.sleep(0.01)
            t0 = time.time()
            (uid,) = engine(plans.synchronized_fly(meters, args.seconds, start_in=0,
                                                   md={"host": args.name}))
            t1 = time.time()
            for i, meter in enumerate(meters):
                np.save(out / f"{meter.name}.npy", fleet.session_truth(i).values)
            if sink is not None:
                sink.close()
        finally:
            for meter in meters:
                meter.destroy()
    print(json.dumps({"uid": uid, "meters": [m.name for m in meters], "start": t0, "stop": t1}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
