"""Export of a recorded run: MKV (ffprobe, decoded samples), CSV and Parquet round trips, the
1 Hz power summary, and the refusal to overwrite.

One run of two emulated meters over UDP, the second losing datagrams the emulator was told
to drop, so that the exports are checked with a real declared gap too.  Samples are compared
with what the catalog serves (:func:`smartmeter_ophyd.readback.meter_data`), bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.export import export_power_summary, export_run
from smartmeter_ophyd.readback import meter_data

RATE = 4000
pytestmark = pytest.mark.slow


@pytest.fixture()
def run(recorded_run: Any) -> Any:
    return recorded_run


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def decode(path: Path, stream: int, channels: int) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", f"0:a:{stream}",
                          "-f", "f32le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<f4").reshape(-1, channels)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffmpeg (Debian: ffmpeg)")
def test_mkv_opens_with_ffprobe_and_decodes_to_the_catalogs_samples(run: Any,
                                                                    tmp_path: Path) -> None:
    result = export_run(run, tmp_path, "mkv")
    assert len(result.paths) == 2
    for path in result.paths:
        meter = path.stem.split("-", 1)[1]
        ds = meter_data(run, meter)
        n = ds.sizes["time"]
        probe = ffprobe(path)
        streams = probe["streams"]
        assert [s["tags"]["title"] for s in streams] == ["L1", "L2", "L3"]
        for k, s in enumerate(streams):
            line = f"l{k + 1}"
            assert s["codec_name"] == "wavpack" and s["channels"] == 2
            assert int(s["sample_rate"]) == RATE
            assert s["tags"]["CHANNEL_TAGS"] == f"v_{line},i_{line}"
            assert s["tags"]["CHANNELS"] == "2"
            assert float(s["tags"]["TIMESTAMP"]) == pytest.approx(float(ds["time"][0]), abs=1e-6)
            decoded = decode(path, k, 2)
            assert decoded.shape == (n, 2)  # received samples only: no fill for the gaps
            for j, channel in enumerate((f"v_{line}", f"i_{line}")):
                assert np.array_equal(decoded[:, j], ds[channel].values)  # lossless, bit-exact
        assert float(probe["format"]["duration"]) == pytest.approx(n / RATE, abs=2e-3)
        gaps = probe["format"]["tags"]["GAPS"]
        table = _gaps(run, meter)
        assert gaps == (";".join(f"{i}:{m}" for i, m in table) or "none")
    # the meter whose datagrams were dropped has its gaps listed and a note for the user
    assert _gaps(run, "exp2"), "the emulator dropped datagrams: the run must declare a gap"
    assert any("exp2" in note and "gap" in note for note in result.notes)


def _gaps(run: Any, meter: str) -> list[tuple[int, int]]:
    from smartmeter_ophyd.storage import read_gaps

    table = read_gaps(run, f"{meter}_gaps", prefix=meter)
    return [(int(i), int(m)) for i, m in zip(table["sample_index"], table["missing_samples"],
                                             strict=True)]


def test_csv_round_trips_exactly(run: Any, tmp_path: Path) -> None:
    (path, _other) = export_run(run, tmp_path, "csv").paths
    ds = meter_data(run, "exp1")
    header = path.read_text().split("\n", 1)[0].split(",")
    assert header == ["time", "sample_index", "v_l1", "i_l1", "v_l2", "i_l2", "v_l3", "i_l3"]
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    assert np.array_equal(table[:, 0], ds["time"].values)
    assert np.array_equal(table[:, 1].astype(np.int64), ds["sample_index"].values)
    for j, name in enumerate(header[2:]):
        assert np.array_equal(table[:, 2 + j].astype(np.float32), ds[name].values)


def test_parquet_round_trips_exactly_with_metadata(run: Any, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    paths = export_run(run, tmp_path, "parquet").paths
    for path in paths:
        meter = path.stem.split("-", 1)[1]
        ds = meter_data(run, meter)
        table = pq.read_table(path)
        assert np.array_equal(table["time"].to_numpy(), ds["time"].values)
        assert np.array_equal(table["sample_index"].to_numpy(), ds["sample_index"].values)
        for name in ds.data_vars:
            column = table[str(name)].to_numpy()
            assert column.dtype == np.float32 and np.array_equal(column, ds[name].values)
        meta = table.schema.metadata
        assert meta[b"meter"].decode() == meter
        assert json.loads(meta[b"units"])["v_l1"] == "V"
        assert [tuple(g) for g in json.loads(meta[b"gaps"])] == _gaps(run, meter)
    gaps = _gaps(run, "exp2")
    index = pq.read_table(paths[1])["sample_index"].to_numpy()
    # a declared gap is visible as a jump of sample_index, never as filled rows
    assert len(index) == meter_data(run, "exp2").sizes["time"] and gaps


def test_power_summary_matches_the_samples(run: Any, tmp_path: Path) -> None:
    import pandas as pd

    (path, _other) = export_power_summary(run, tmp_path, "csv").paths
    frame = pd.read_csv(path)
    assert list(frame.columns)[:3] == ["time (s)", "samples", "v_l1_rms (V)"]
    ds = meter_data(run, "exp1")
    t = ds["time"].values
    assert frame["samples"].sum() == len(t)
    for _, row in frame.iterrows():
        inside = np.floor(t) == row["time (s)"]
        v = ds["v_l1"].values[inside].astype(np.float64)
        i = ds["i_l1"].values[inside].astype(np.float64)
        assert row["samples"] == inside.sum()
        assert row["v_l1_rms (V)"] == pytest.approx(np.sqrt(np.mean(v * v)), rel=1e-9)
        assert row["p_l1 (W)"] == pytest.approx(np.mean(v * i) / 1000, rel=1e-9, abs=1e-9)
    full = frame[frame["samples"] == RATE]
    assert len(full) >= 1
    assert full["v_l1_rms (V)"].between(225, 235).all()  # the emulated grid: 230 V rms
    assert full["frequency (Hz)"].between(49.5, 50.5).all()


def test_exports_refuse_to_overwrite(run: Any, tmp_path: Path) -> None:
    first = export_run(run, tmp_path, "csv", meters=["exp1"])
    stamp = first.paths[0].stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        export_run(run, tmp_path, "csv", meters=["exp1"])
    assert first.paths[0].stat().st_mtime_ns == stamp
    export_run(run, tmp_path, "csv", meters=["exp1"], overwrite=True)
    export_power_summary(run, tmp_path, "parquet", meters=["exp1"])
    with pytest.raises(FileExistsError):
        export_power_summary(run, tmp_path, "parquet", meters=["exp1"])
