"""Storage benchmark: one meter-hour of 8 kHz x 6 channels through the real path, then read back.

Writes 28.8 M samples x 6 float32 (~691 MB, plus a 230 MB float64 time dataset) with
WaveformWriter inside a RunEngine flyer whose StreamResource/StreamDatum documents go through
bluesky_tiled_plugins.TiledWriter into the embedded catalog (few, large collects), then reads a
time slice back through the catalog (databroker.from_profile, in-process Tiled) and directly
from the HDF5 file, and prints MB/s for both and the catalog/direct ratio.

    .venv/bin/python benchmarks/storage.py [--seconds 3600] [--slice 600] [--dir DIR]

Target: catalog read-back >= 0.5 GB/s for a time slice.  Run it alone (it is I/O and CPU heavy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import bluesky.plan_stubs as bps
import numpy as np
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from ophyd.status import DeviceStatus, Status

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import (
    StreamAssets,
    WaveformWriter,
    close_client,
    setup_embedded_catalog,
    stream_data_keys,
    time_window,
    time_window_hdf5,
)

RATE = 8000
MEASURES = Measures.VI


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
    ap.add_argument("--slice", type=float, default=600.0, help="length of the read slice, s")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--flush-period", type=float, default=5.0)
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="smartmeter-bench-"))
    try:
        t0 = time.perf_counter()
        cat = setup_embedded_catalog(work / "catalog", "smartmeter-bench", profiles_dir=work / "profiles")
        client = cat.client
        print(f"catalog setup: {time.perf_counter() - t0:.1f} s")

        n = int(args.seconds * RATE)
        meter = BenchMeter("bench", cat.data_directory, n, block=RATE * 60)
        engine = RunEngine({})
        counts: dict[str, int] = {}
        engine.subscribe(lambda name, doc: counts.__setitem__(name, counts.get(name, 0) + 1))
        engine.subscribe(TiledWriter(client, batch_size=RATE * 600))

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
            f"in {wall:.1f} s wall, {cpu:.1f} s CPU -> {payload / wall / 1e6:.0f} MB/s; documents {counts}"
        )
        close_client(client)
        cat.close()

        reader = cat.open()  # fresh in-process client, as databroker.from_profile gives it
        run = reader[uid]
        ts = meter.start_ts + args.seconds / 2
        t_lo, t_hi = ts - args.slice / 2, ts + args.slice / 2

        def timed(fn):
            best = float("inf")
            for _ in range(3):
                s = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - s)
            return best, out

        dt_cat, ds_cat = timed(lambda: time_window(run, t_lo, t_hi, "meter"))
        dt_dir, ds_dir = timed(lambda: time_window_hdf5(meter.writer.path, t_lo, t_hi))
        nbytes = ds_dir.sizes["time"] * (6 * 4 + 8)
        same = all(
            np.array_equal(ds_cat[f"bench_{ch}"].values, ds_dir[ch].values) for ch in MEASURES.channels
        )
        mbps_cat, mbps_dir = nbytes / dt_cat / 1e6, nbytes / dt_dir / 1e6
        print(
            f"time slice of {args.slice:.0f} s ({ds_dir.sizes['time']:,} samples, {nbytes / 1e6:.0f} MB "
            f"incl. time), best of 3: catalog {dt_cat:.3f} s = {mbps_cat:.0f} MB/s, "
            f"direct HDF5 {dt_dir:.3f} s = {mbps_dir:.0f} MB/s, ratio catalog/direct "
            f"{mbps_cat / mbps_dir:.2f}; identical: {same}"
        )
        print(f"target catalog >= 500 MB/s: {'met' if mbps_cat >= 500 else 'NOT met'}")
        close_client(reader)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
