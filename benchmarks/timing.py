"""Stored sample times and alignment of a synchronized fly, against the emulator's truth.

Three emulated meters (one process, ``EmulatorFleet``) with independent clocks - ADE crystals
and RTCs drifting apart, each meter synced to its own time server that is off by a known
amount - are recorded by ``plans.synchronized_fly`` into an embedded catalog.  For every
stored sample, the error is the stored time minus the instant the emulator really took it.
The figures, each beside its baseline from the same run:

* the stored time error (p99, max) against the nominal model ``start_ts + index / rate``;
* the error beyond each meter's NTP confidence (the promise: stored times are within the
  confidence of the sync they stand on + 1 ms);
* the alignment residual: each window's measured offset against the truth (the difference
  of the two meters' stored-time errors), and how often the stated uncertainty covers it.

Last two lines: ``stored time error beyond confidence, max: X ms`` (goal X <= 1) and
``alignment residual max: Y us`` (goal Y <= 10).

Usage: ``python benchmarks/timing.py [--seconds 30] [--ntp-period 10]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

DRIFTS = (
    {"ade_drift_ppm": -50.0, "rtc_drift_ppm": -20.0, "time_server_offset_s": -0.0008},
    {"ade_drift_ppm": 0.0, "rtc_drift_ppm": 0.0, "time_server_offset_s": 0.0},
    {"ade_drift_ppm": 50.0, "rtc_drift_ppm": 20.0, "time_server_offset_s": 0.0009},
)


@dataclass
class MeterResult:
    name: str
    stored: np.ndarray
    true: np.ndarray
    nominal: np.ndarray
    confidence_s: float

    @property
    def error(self) -> np.ndarray:
        return self.stored - self.true


def record(seconds: float, ntp_period: float, per_meter: Sequence[dict[str, Any]],
           directory: Path) -> tuple[list[MeterResult], dict[str, list[Any]]]:
    """Fly the meters once; their stored/true/nominal times and the alignment table."""
    from bluesky import RunEngine

    import plans
    from smartmeter_ophyd.devices import SmartMeter
    from smartmeter_ophyd.emulator import EmulatorFleet
    from smartmeter_ophyd.storage import make_tiled_writer, setup_embedded_catalog

    catalog = setup_embedded_catalog(directory / "catalog", profile="timing-benchmark",
                                     profiles_dir=directory / "profiles")
    documents: list[tuple[str, dict[str, Any]]] = []
    try:
        with EmulatorFleet(list(per_meter), name_prefix="bench") as fleet:
            meters = [SmartMeter(host, port, name=f"m{i + 1}",
                                 data_directory=catalog.data_directory, emulated=True)
                      for i, (host, port) in enumerate(fleet.addresses)]
            try:
                engine = RunEngine({})
                engine.subscribe(make_tiled_writer(catalog.client))
                engine.subscribe(lambda name, doc: documents.append((name, doc)))
                engine(plans.synchronized_fly(meters, seconds, ntp_period=ntp_period))
                results = []
                for i, meter in enumerate(meters):
                    with h5py.File(meter.hdf5_path, "r") as f:
                        stored = f["time"][()]
                    truth = fleet.call(fleet.meter(i).session_truth)
                    history = fleet.ntp_history(i)
                    summary = meter.last_summary
                    assert summary is not None and summary.explained, summary
                    results.append(MeterResult(
                        name=meter.name, stored=stored, true=truth.true_times[: len(stored)],
                        nominal=summary.start_ts + np.arange(len(stored)) / summary.rate,
                        confidence_s=max(h.confidence_ms for h in history) * 1e-3,
                    ))
            finally:
                for meter in meters:
                    meter.destroy()
    finally:
        catalog.close()
    table: dict[str, list[Any]] = {}
    descriptors = {d["uid"] for name, d in documents
                   if name == "descriptor" and d["name"] == "alignment"}
    for name, doc in documents:
        if name == "event_page" and doc["descriptor"] in descriptors:
            for key, values in doc["data"].items():
                table.setdefault(key, []).extend(values)
    return results, table


def error_at(time: np.ndarray, error: np.ndarray, at: np.ndarray, half: int = 160) -> np.ndarray:
    """Stored-time error at ``at``: a line through the ``2 half`` nearest samples (stored and
    true times are float64 unix seconds rounded to 0.24 us; one sample would add that
    rounding of the ground truth itself)."""
    out = np.empty(np.shape(at))
    for k, x in enumerate(np.atleast_1d(at)):
        j = int(np.clip(np.searchsorted(time, x), half, time.size - half))
        out[k] = np.polyfit(time[j - half:j + half] - x, error[j - half:j + half], 1)[1]
    return out


def alignment_residuals(results: Sequence[MeterResult], table: dict[str, list[Any]]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per window: |measured - true offset| and whether the uncertainty covers it."""
    from smartmeter_ophyd.timing import alignment_from_table

    ref = results[0]
    residual, covered = [], []
    for meter in results[1:]:
        result = alignment_from_table(table, meter.name)
        mid = 0.5 * (result.window_start + result.window_end)
        truth = (error_at(meter.stored, meter.error, mid)
                 - error_at(ref.stored, ref.error, mid - result.offset_s))
        miss = np.abs(result.offset_s - truth)
        residual.append(miss)
        covered.append(miss <= result.uncertainty_s)
    return np.concatenate(residual), np.concatenate(covered)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--ntp-period", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as directory:
        results, table = record(args.seconds, args.ntp_period, DRIFTS, Path(directory))
    beyond = 0.0
    for r in results:
        err, nom = np.abs(r.error), np.abs(r.nominal - r.true)
        beyond = max(beyond, float(np.max(err - r.confidence_s)))
        print(f"{r.name}: {len(err)} samples; stored error p99 {np.percentile(err, 99) * 1e3:.3f}"
              f" ms, max {err.max() * 1e3:.3f} ms; nominal model p99 "
              f"{np.percentile(nom, 99) * 1e3:.3f} ms, max {nom.max() * 1e3:.3f} ms; "
              f"NTP confidence {r.confidence_s * 1e3:.0f} ms")
    residual, covered = alignment_residuals(results, table)
    print(f"alignment: {residual.size} windows, uncertainty covers the truth in "
          f"{covered.mean():.1%}")
    print(f"stored time error beyond confidence, max: {max(beyond, 0.0) * 1e3:.3f} ms")
    print(f"alignment residual max: {residual.max() * 1e6:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
