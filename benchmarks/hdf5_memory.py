"""HDF5's own memory while waveform files grow: bounded (the writer's settings) against HDF5's
defaults, in the same run.

Why: the hour's soak saw the acquisition process's malloc grow ~+2.8 MB/h over its second
half with no growing Python allocation.  This script replays the I/O thread's side of a run at
many times real time: ``--meters`` :class:`~smartmeter_ophyd.storage.WaveformWriter` files of
8 kHz x 6 channels (the emulator's noise amplitude; the default compression and 2-s chunks),
fed 400-row appends with their frame numbers and a ``live_index`` every "second", as the
client's reader thread and the flyer do.  Each setting runs in its own process (HDF5's
free-list limits are process-wide):

* ``bounded``: the writer as it is (``storage._hdf5_memory``: metadata cache capped per file,
  block free-list limits lowered);
* ``hdf5 defaults``: the same with both settings skipped.

Printed every "10 min" of data: malloc in use (glibc), RSS, the files' metadata caches and
HDF5's free lists; then per setting the slope of malloc in use over the second half (MB/h of
data), the CPU time, and malloc in use after the files closed.  Last line:
``malloc in use over the second half: X MB/h bounded, Y MB/h with HDF5's defaults``

Usage: ``python benchmarks/hdf5_memory.py [--meters 3] [--minutes 120]`` (~1 min of CPU per
meter-hour and setting).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import host_load
from _memory import mallinfo, mappings

RATE = 8000
START = 1_750_000_000.25
FRAME = 42  # samples per 1008-byte frame at 8 kHz, 3-phase (§4.5)
APPENDS_PER_S = 20
NOISE = 100.0


def replay(meters: int, minutes: float, bounded: bool, directory: Path) -> dict[str, object]:
    """Write the files in this process; the figures as a dict."""
    from smartmeter_ophyd.protocol import Measures
    from smartmeter_ophyd.storage import _hdf5, _hdf5_memory

    if not bounded:
        _hdf5.limit_block_free_lists = lambda: False  # type: ignore[assignment]
        _hdf5.bound_metadata_cache = lambda file, max_bytes=0: None  # type: ignore[assignment]
    rows = (np.random.default_rng(1).standard_normal((RATE // APPENDS_PER_S, 6)) * NOISE)
    rows = rows.astype(np.float32)
    frames = np.full(-(-rows.shape[0] // FRAME), FRAME)
    frames[-1] = rows.shape[0] - FRAME * (frames.size - 1)
    writers = [_hdf5.WaveformWriter(directory / f"m{i}.h5", Measures.VI, RATE, START,
                                    {"name": f"m{i}"}) for i in range(meters)]
    samples: list[dict[str, float]] = []

    def sample(appends: int) -> None:
        caches = [w._file.id.get_mdc_size()[2] for w in writers]
        lists = _hdf5_memory.free_list_sizes() or (0, 0, 0, 0)
        samples.append({"minutes": appends / APPENDS_PER_S / 60,
                        "in_use": mallinfo().in_use, "rss": mappings()["total"],
                        "caches": sum(caches) / 2**20, "free_lists": sum(lists) / 2**20})

    appends = int(minutes * 60 * APPENDS_PER_S)
    packet = 0
    cpu = time.process_time()
    for k in range(appends):
        if k % (600 * APPENDS_PER_S) == 0:
            sample(k)
        for w in writers:
            w.append(rows, packets=packet + np.arange(frames.size), frame_samples=frames)
        packet += frames.size
        if k % APPENDS_PER_S == 0:
            for w in writers:
                w.live_index()
    sample(appends)
    cpu = time.process_time() - cpu
    for w in writers:
        w.close()
    return {"samples": samples, "cpu_s": cpu, "after_close": mallinfo().in_use}


def slope_mb_per_h(samples: list[dict[str, float]], key: str) -> float:
    half = [s for s in samples if s["minutes"] >= samples[-1]["minutes"] / 2]
    hours = np.array([s["minutes"] for s in half]) / 60
    return float(np.polyfit(hours, [s[key] for s in half], 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--child", choices=("bounded", "defaults"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minutes < 20:
        parser.error("--minutes must be at least 20 (the slope is taken over the second half)")
    if args.child:
        with tempfile.TemporaryDirectory() as directory:
            figures = replay(args.meters, args.minutes, args.child == "bounded", Path(directory))
        print(json.dumps(figures))
        return

    print(f"{args.meters} meters at {RATE} Hz x 6 channels, {args.minutes:g} min of data per "
          f"setting; {host_load()}")
    slopes = {}
    for setting in ("bounded", "defaults"):
        done = subprocess.run([sys.executable, __file__, "--child", setting, "--meters",
                               str(args.meters), "--minutes", str(args.minutes)],
                              capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.splitlines()[-1])
        name = "bounded" if setting == "bounded" else "hdf5 defaults"
        print(f"\n{name}:")
        print("  data (min)  malloc in use (MB)  RSS (MB)  metadata caches (MB)  "
              "free lists (MB)")
        for s in figures["samples"]:
            print(f"  {s['minutes']:10.0f}  {s['in_use']:18.2f}  {s['rss']:8.1f}  "
                  f"{s['caches']:20.2f}  {s['free_lists']:15.2f}")
        slopes[setting] = slope_mb_per_h(figures["samples"], "in_use")
        print(f"  second half: malloc in use {slopes[setting]:+.2f} MB/h, RSS "
              f"{slope_mb_per_h(figures['samples'], 'rss'):+.2f} MB/h; CPU "
              f"{figures['cpu_s']:.1f} s; malloc in use after closing the files "
              f"{figures['after_close']:.2f} MB")
    print(f"\nmalloc in use over the second half: {slopes['bounded']:+.2f} MB/h bounded, "
          f"{slopes['defaults']:+.2f} MB/h with HDF5's defaults")


if __name__ == "__main__":
    main()
