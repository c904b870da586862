"""Storage benchmark: one meter-hour of 8 kHz x 6 channels through the real path, then read back.

Writes 28.8 M samples x 6 float32 (~691 MB, plus a 230 MB float64 time dataset) with
WaveformWriter inside a RunEngine flyer whose StreamResource/StreamDatum documents go through
``make_tiled_writer`` (TiledWriter + CompactHDF5Consolidator) into the embedded catalog and,
unless ``--no-server``, into a PostgreSQL-backed ``tiled serve`` (scripts/postgres.sh, a
separate process) at the same time (the write time covers both writers).  Then it reads a time
slice (default 20 min from the middle of the hour, 9.6 M samples = 307 MB incl. time) back,
best of 3, and prints MB/s for:

* embedded catalog, ``access="asset"`` (the catalog locates the HDF5 file/dataset/shape, h5py
  reads it) and ``access="http"`` (Tiled's array endpoint, in-process ASGI);
* the server, both ways (``asset`` is possible because the server's files are local here);
* direct HDF5 (``time_window_hdf5``), and the ratio catalog/direct.

    .venv/bin/python benchmarks/storage.py [--seconds 3600] [--slice 1200] [--dir DIR] [--no-server]

Target: catalog read-back >= 0.5 GB/s for a time slice.  Run it alone (it is I/O and CPU heavy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import bluesky.plan_stubs as bps
import numpy as np
from bluesky import RunEngine
from ophyd.status import DeviceStatus, Status

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import (
    StreamAssets,
    WaveformWriter,
    close_client,
    connect_server,
    make_tiled_writer,
    setup_embedded_catalog,
    stream_data_keys,
    time_window,
    time_window_hdf5,
)

RATE = 8000
MEASURES = Measures.VI
POSTGRES_SH = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"


class BenchMeter:
    """Flyer writing synthetic data as fast as possible in large blocks."""

    parent = None

    def __init__(self, name: str, directory: Path, n_samples: int, block: int) -> None:
        self.name, self.directory, self.n_samples, self.block = name, directory, n_samples, block
        self.start_ts = 1_700_000_000.0

    def describe_collect(self):
        return stream_data_keys(self.name, MEASURES.channels, MEASURES.units, f"bench:{self.name}")

    def kickoff(self) -> Status:
        self.writer = WaveformWriter(
            self.directory / f"{self.name}.h5", MEASURES, RATE, self.start_ts, {"name": self.name}
        )
        self.assets = StreamAssets(self.writer, self.name)
        self._done = DeviceStatus(self)
        t = np.arange(self.block) / RATE
        base = (325 * np.sin(2 * np.pi * 50 * t[:, None] + np.arange(6))).astype(np.float32)

        def feed() -> None:
            written = 0
            while written < self.n_samples:
                n = min(self.block, self.n_samples - written)
                self.writer.append(base[:n] + np.float32(written % 997))
                written += n
            self.writer.close()
            self._done.set_finished()

        threading.Thread(target=feed, daemon=True).start()
        st = Status()
        st.set_finished()
        return st

    def complete(self):
        return self._done

    def get_index(self) -> int:
        return self.assets.get_index()

    def collect_asset_docs(self, index=None):
        yield from self.assets.collect_asset_docs(index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3600.0, help="meter seconds to write")
    ap.add_argument("--slice", type=float, default=1200.0, help="length of the read slice, s")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--flush-period", type=float, default=5.0)
    ap.add_argument("--no-server", action="store_true", help="skip the PostgreSQL Tiled server")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="smartmeter-bench-"))
    pg_dir: Path | None = None
    try:
        server: dict[str, str] = {}
        if not args.no_server:
            t0 = time.perf_counter()
            pg_dir = Path(tempfile.mkdtemp(prefix="smartmeter-bench-pg-", dir="/tmp"))
            pg_dir.chmod(0o755)  # the cluster runs as user postgres
            out = subprocess.run(
                [str(POSTGRES_SH), "start", str(pg_dir)], check=True, capture_output=True, text=True
            ).stdout
            server = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            print(f"PostgreSQL Tiled server: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        hdf5_dir = Path(server["TILED_HDF5_DIR"]) if server else None
        cat = setup_embedded_catalog(
            work / "catalog",
            "smartmeter-bench",
            profiles_dir=work / "profiles",
            data_directory=hdf5_dir,
        )
        client = cat.client
        print(f"catalog setup: {time.perf_counter() - t0:.1f} s")

        n = int(args.seconds * RATE)
        meter = BenchMeter("bench", cat.data_directory, n, block=RATE * 60)
        engine = RunEngine({})
        counts: dict[str, int] = {}
        engine.subscribe(lambda name, doc: counts.__setitem__(name, counts.get(name, 0) + 1))
        engine.subscribe(make_tiled_writer(client, batch_size=RATE * 600))
        if server:
            engine.subscribe(
                make_tiled_writer(
                    connect_server(server["TILED_URI"], server["TILED_API_KEY"]),
                    batch_size=RATE * 600,
                )
            )

        def plan():
            yield from bps.open_run()
            yield from bps.declare_stream(meter, name="meter", collect=True)
            yield from bps.kickoff(meter, wait=True)
            yield from bps.collect_while_completing(
                [meter], [meter], flush_period=args.flush_period, stream_name="meter"
            )
            yield from bps.close_run()

        cpu0, t0 = time.process_time(), time.perf_counter()
        (uid,) = engine(plan())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        size = os.path.getsize(meter.writer.path)
        payload = n * 6 * 4
        print(
            f"write: {n:,} samples x 6 ch ({payload / 1e6:.0f} MB float32, file {size / 1e6:.0f} MB) "
            f"in {wall:.1f} s wall, {cpu:.1f} s CPU -> {payload / wall / 1e6:.0f} MB/s "
            f"({1 + bool(server)} catalog writer(s)); documents {counts}"
        )
        close_client(client)
        cat.close()

        ts = meter.start_ts + args.seconds / 2
        t_lo, t_hi = ts - args.slice / 2, ts + args.slice / 2

        def timed(fn):
            best = float("inf")
            for _ in range(3):
                s = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - s)
            return best, out

        dt_dir, ds_dir = timed(lambda: time_window_hdf5(meter.writer.path, t_lo, t_hi))
        samples = ds_dir.sizes["time"]
        nbytes = samples * (6 * 4 + 8)
        mbps_dir = nbytes / dt_dir / 1e6
        print(
            f"time slice of {args.slice:.0f} s from the middle of the run ({samples:,} samples, "
            f"{nbytes / 1e6:.0f} MB incl. time), best of 3:"
        )
        print(f"  direct HDF5                    {dt_dir:7.3f} s = {mbps_dir:6.0f} MB/s")

        readers = {"embedded": cat.open()}  # fresh in-process client, as from_profile gives it
        if server:
            readers["server"] = connect_server(server["TILED_URI"], server["TILED_API_KEY"])
        best_catalog = 0.0
        for where, reader in readers.items():
            run = reader[uid]
            for access in ("asset", "http"):
                dt, ds = timed(
                    lambda run=run, access=access: time_window(
                        run, t_lo, t_hi, "meter", access=access
                    )
                )
                same = (
                    ds.attrs["first_index"] == ds_dir.attrs["first_index"]
                    and all(
                        np.array_equal(ds[f"bench_{ch}"].values, ds_dir[ch].values)
                        for ch in MEASURES.channels
                    )
                    and np.array_equal(ds["time"].values, ds_dir["time"].values)
                )
                mbps = nbytes / dt / 1e6
                best_catalog = max(best_catalog, mbps) if where == "embedded" else best_catalog
                print(
                    f"  {where:8} catalog, {access:5}       {dt:7.3f} s = {mbps:6.0f} MB/s, "
                    f"ratio catalog/direct {mbps / mbps_dir:.2f}; identical: {same}"
                )
            close_client(reader)
        print(
            f"target embedded catalog >= 500 MB/s: {'met' if best_catalog >= 500 else 'NOT met'} "
            f"({best_catalog:.0f} MB/s, default access='auto' picks 'asset' for local files)"
        )
    finally:
        if pg_dir is not None:
            subprocess.run([str(POSTGRES_SH), "stop", str(pg_dir)], capture_output=True)
            shutil.rmtree(pg_dir, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
