"""Export a recorded run: per-meter CSV, Parquet or MKV, and a 1 Hz power summary.

One file per meter, named ``<uid8>-<meter>.<ext>`` in the chosen directory, read chunk by
chunk through :mod:`smartmeter_ophyd.readback` (never the whole run in memory):

* **CSV** - a header row, then ``time,sample_index,<channels…>``; ``time`` printed with 17
  significant digits and the channels with 9, so float64 times and float32 samples
  round-trip exactly.
* **Parquet** - the same columns (``time`` float64, ``sample_index`` int64, channels
  float32); the file's key-value metadata holds the meter, run uid, units, time source and
  the gaps table (JSON).
* **MKV** - WavPack (lossless, 32-bit float) in Matroska through ``ffmpeg``, as the meter
  author's FIRED tooling writes it (protocol.md §13.5): one audio stream per line with that
  line's channels (``v_l1,i_l1`` …), each tagged ``title``, ``CHANNELS``, ``CHANNEL_TAGS``
  and ``TIMESTAMP`` (the first sample's time, unix seconds).  The container also carries
  ``METER``, ``RUN_UID``, ``UNITS``, ``TIME_SOURCE`` and ``GAPS`` (``none`` without gaps).

  Audio has no per-sample time: an MKV sample ``n`` is at ``TIMESTAMP + n / rate`` only
  nominally.  Samples lost in declared gaps are *not* in the file (never filled): the
  ``GAPS`` tag lists ``sample_index:missing`` pairs (the index of the first sample after
  each gap), and :func:`export_run` returns a note for every meter that has gaps.  The
  exact times stay in the catalog and in the CSV/Parquet exports.

* **Power summary** (:func:`export_power_summary`) - one row per second
  (:func:`~smartmeter_ophyd.readback.power_summary`): RMS voltage and current, active and
  apparent power per line and in total, frequency, and the samples each second holds; CSV
  or Parquet, the shape NILM tools read (a time column in unix seconds, one column per
  quantity, units in the header / metadata).

Every writer refuses to overwrite an existing file unless ``overwrite=True``; files are
written under a temporary name and renamed when complete, so an interrupted export leaves
no half file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

import numpy as np
import xarray as xr

from .readback import (
    first_last_time,
    iter_windows,
    power_summary,
    run_meters,
    summary_units,
    time_source,
)

logger = logging.getLogger(__name__)

Format = Literal["csv", "parquet", "mkv"]
FORMATS: Final = ("csv", "parquet", "mkv")
SUMMARY_FORMATS: Final = ("csv", "parquet")
CHUNK_S: Final = 60.0


class ExportError(RuntimeError):
    """An export failed or cannot start; the message names the meter and the cause."""


@dataclass
class Exported:
    """What one export call wrote."""

    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things the user must know (gaps the MKV cannot show, …)."""


# ------------------------------------------------------------------------------ helpers


def _uid8(run: Any) -> str:
    return str(run.start["uid"])[:8]


def _meters(run: Any, meters: Sequence[str] | None) -> list[str]:
    recorded = run_meters(run)
    if meters is None:
        return recorded
    unknown = [m for m in meters if m not in recorded]
    if unknown:
        raise ExportError(f"run {_uid8(run)} has no meter(s) {unknown}; meters: {recorded}")
    return list(meters)


def export_paths(run: Any, directory: str | os.PathLike[str], fmt: str,
                 meters: Sequence[str] | None = None, suffix: str = "") -> dict[str, Path]:
    """``{meter: path}`` an export of ``fmt`` writes (``suffix`` e.g. ``-power-1s``)."""
    base = Path(directory)
    return {m: base / f"{_uid8(run)}-{m}{suffix}.{fmt}" for m in _meters(run, meters)}


def _check_free(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) to replace"
        )


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` renamed onto it on success, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _gaps(run: Any, meter: str) -> list[tuple[int, int]]:
    from .storage import read_gaps

    stream = f"{meter}_gaps"
    if stream not in run:
        return []
    table = read_gaps(run, stream, prefix=meter)
    return [(int(i), int(m)) for i, m in zip(table["sample_index"], table["missing_samples"],
                                             strict=True)]


def _channels(ds: xr.Dataset) -> list[str]:
    return [str(name) for name in ds.data_vars]


def _units(ds: xr.Dataset) -> dict[str, str]:
    return {name: str(ds[name].attrs.get("units", "")) for name in _channels(ds)}


# --------------------------------------------------------------------------- CSV/Parquet


def _write_csv_chunk(handle: IO[str], ds: xr.Dataset, header: bool) -> None:
    channels = _channels(ds)
    if header:
        handle.write(",".join(["time", "sample_index", *channels]) + "\n")
    columns = [np.asarray(ds["time"].values, dtype=np.float64),
               np.asarray(ds["sample_index"].values, dtype=np.int64),
               *(np.asarray(ds[c].values) for c in channels)]
    fmt = ["%.17g", "%d", *("%.9g" for _ in channels)]
    np.savetxt(handle, np.column_stack([c.astype(object) for c in columns]), fmt=fmt,
               delimiter=",")


def _parquet_metadata(run: Any, meter: str, units: dict[str, str]) -> dict[bytes, bytes]:
    values = {
        "meter": meter,
        "run_uid": str(run.start["uid"]),
        "units": json.dumps({"time": "s", **units}),
        "time_source": time_source(run, meter),
        "gaps": json.dumps(_gaps(run, meter)),
    }
    return {k.encode(): v.encode() for k, v in values.items()}


def _export_table(run: Any, meter: str, path: Path, fmt: str, chunk_s: float) -> int:
    """Write one meter's samples as CSV or Parquet; returns the rows written."""
    rows = 0
    with _atomic(path) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="") as handle:
                for ds in iter_windows(run, meter, chunk_s):
                    _write_csv_chunk(handle, ds, header=rows == 0)
                    rows += ds.sizes["time"]
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = None
            try:
                for ds in iter_windows(run, meter, chunk_s):
                    arrays = {"time": np.asarray(ds["time"].values, dtype=np.float64),
                              "sample_index": np.asarray(ds["sample_index"].values,
                                                         dtype=np.int64)}
                    arrays.update({c: np.asarray(ds[c].values) for c in _channels(ds)})
                    table = pa.table(arrays)
                    if writer is None:
                        schema = table.schema.with_metadata(
                            _parquet_metadata(run, meter, _units(ds)))
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.write_table(table.replace_schema_metadata(schema.metadata))
                    rows += ds.sizes["time"]
            finally:
                if writer is not None:
                    writer.close()
        if rows == 0:
            raise ExportError(f"meter {meter!r} recorded no samples in run {_uid8(run)}")
    return rows


# ---------------------------------------------------------------------------------- MKV


def _line_streams(channels: Sequence[str]) -> list[tuple[str, list[int]]]:
    """``(line, channel indices)`` per line, in the order the lines first appear (§4.2)."""
    lines: dict[str, list[int]] = {}
    for k, name in enumerate(channels):
        lines.setdefault(name.rsplit("_", 1)[-1].upper(), []).append(k)
    return list(lines.items())


def _ffmpeg_command(path: Path, meter: str, run_uid: str, rate: int, channels: Sequence[str],
                    units: dict[str, str], t_first: float, source: str,
                    gaps: Sequence[tuple[int, int]]) -> list[str]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ExportError("MKV export needs ffmpeg (Debian package 'ffmpeg'); it is not on PATH")
    streams = _line_streams(channels)
    graph = []
    for k, (_line, idx) in enumerate(streams):
        layout = "mono" if len(idx) == 1 else "stereo" if len(idx) == 2 else f"{len(idx)}c"
        mapping = "|".join(f"c{j}=c{i}" for j, i in enumerate(idx))
        graph.append(f"[0:a]pan={layout}|{mapping}[s{k}]")
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "f32le",
           "-ar", str(rate), "-guess_layout_max", "0", "-ac", str(len(channels)), "-i", "pipe:0",
           "-filter_complex", ";".join(graph)]
    for k in range(len(streams)):
        cmd += ["-map", f"[s{k}]"]
    cmd += ["-c:a", "wavpack", "-sample_fmt", "fltp"]
    cmd += ["-metadata", f"title={meter}", "-metadata", f"METER={meter}",
            "-metadata", f"RUN_UID={run_uid}",
            "-metadata", "UNITS=" + ",".join(f"{c}:{units.get(c, '')}" for c in channels),
            "-metadata", f"TIME_SOURCE={source}",
            "-metadata", "GAPS=" + (";".join(f"{i}:{m}" for i, m in gaps) or "none")]
    for k, (line, idx) in enumerate(streams):
        tags = ",".join(channels[i] for i in idx)
        cmd += [f"-metadata:s:a:{k}", f"title={line}",
                f"-metadata:s:a:{k}", f"CHANNELS={len(idx)}",
                f"-metadata:s:a:{k}", f"CHANNEL_TAGS={tags}",
                f"-metadata:s:a:{k}", f"TIMESTAMP={t_first:.6f}"]
    cmd += ["-f", "matroska", str(path)]
    return cmd


def _rate_of(run: Any, meter: str) -> int:
    fly = (run.start.get("meters", {}).get(meter) or {}).get("fly") or {}
    rate = fly.get("rate")
    if rate is None:
        rate = run.start.get("plan_args", {}).get("rate")
        if isinstance(rate, dict):
            rate = rate.get(meter)
    if not isinstance(rate, int) or rate <= 0:
        raise ExportError(f"run {_uid8(run)} does not record the sampling rate of {meter!r}")
    return rate


def _export_mkv(run: Any, meter: str, path: Path, chunk_s: float) -> tuple[int, list[str]]:
    span = first_last_time(run, meter)
    if span is None:
        raise ExportError(f"meter {meter!r} recorded no samples in run {_uid8(run)}")
    gaps = _gaps(run, meter)
    rate = _rate_of(run, meter)
    rows = 0
    notes = []
    with _atomic(path) as tmp:
        proc: subprocess.Popen[bytes] | None = None
        try:
            for ds in iter_windows(run, meter, chunk_s):
                channels = _channels(ds)
                if proc is None:
                    cmd = _ffmpeg_command(tmp, meter, str(run.start["uid"]), rate, channels,
                                          _units(ds), span[0], time_source(run, meter), gaps)
                    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
                block = np.column_stack([np.asarray(ds[c].values, dtype="<f4")
                                         for c in channels])
                assert proc.stdin is not None
                proc.stdin.write(np.ascontiguousarray(block).tobytes())
                rows += block.shape[0]
            if proc is None:
                raise ExportError(f"meter {meter!r} recorded no samples in run {_uid8(run)}")
            assert proc.stdin is not None and proc.stderr is not None
            proc.stdin.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise ExportError(f"ffmpeg failed writing {path} for {meter!r}: {err}")
        except BrokenPipeError as exc:
            err = proc.stderr.read().decode(errors="replace") if proc and proc.stderr else ""
            raise ExportError(f"ffmpeg stopped reading for {meter!r}: {err.strip()}") from exc
        finally:
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                for pipe in (proc.stdin, proc.stderr):
                    if pipe is not None:
                        with contextlib.suppress(BrokenPipeError):  # unflushed input to a dead ffmpeg
                            pipe.close()
    if gaps:
        missing = sum(m for _i, m in gaps if m > 0)
        notes.append(
            f"{path.name}: {meter} has {len(gaps)} gap(s) ({missing} samples declared missing); "
            "the MKV holds the received samples back to back, its GAPS tag lists them"
        )
    return rows, notes


# --------------------------------------------------------------------------------- public


def export_run(
    run: Any,
    directory: str | os.PathLike[str],
    fmt: str,
    *,
    meters: Sequence[str] | None = None,
    overwrite: bool = False,
    chunk_s: float = CHUNK_S,
) -> Exported:
    """Write every meter's samples of ``run`` as ``fmt`` (``csv``, ``parquet`` or ``mkv``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
    paths = export_paths(run, directory, fmt, meters)
    _check_free(list(paths.values()), overwrite)
    out = Exported()
    for meter, path in paths.items():
        if fmt == "mkv":
            rows, notes = _export_mkv(run, meter, path, chunk_s)
            out.notes += notes
        else:
            rows = _export_table(run, meter, path, fmt, chunk_s)
        logger.info("%s: %d samples of %s", path, rows, meter)
        out.paths.append(path)
    return out


def export_power_summary(
    run: Any,
    directory: str | os.PathLike[str],
    fmt: str = "csv",
    *,
    meters: Sequence[str] | None = None,
    period_s: float = 1.0,
    overwrite: bool = False,
) -> Exported:
    """Write each meter's per-``period_s`` power summary as CSV or Parquet."""
    if fmt not in SUMMARY_FORMATS:
        raise ValueError(
            f"power summary format {fmt!r} is not supported; allowed: {', '.join(SUMMARY_FORMATS)}"
        )
    suffix = f"-power-{period_s:g}s"
    paths = export_paths(run, directory, fmt, meters, suffix=suffix)
    _check_free(list(paths.values()), overwrite)
    out = Exported()
    for meter, path in paths.items():
        summary = power_summary(run, meter, period_s)
        frame = summary.to_dataframe().reset_index()
        with _atomic(path) as tmp:
            if fmt == "csv":
                header = [f"{c} ({summary_units(c)})" if summary_units(c) else c
                          for c in frame.columns]
                frame.to_csv(tmp, index=False, header=header, float_format="%.10g")
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pa.Table.from_pandas(frame, preserve_index=False)
                meta = {b"meter": meter.encode(), b"run_uid": str(run.start["uid"]).encode(),
                        b"period_s": str(period_s).encode(),
                        b"time_source": summary.attrs["time_source"].encode(),
                        b"units": json.dumps({c: summary_units(c) for c in frame.columns}).encode()}
                pq.write_table(table.replace_schema_metadata(meta), tmp)
        out.paths.append(path)
    return out
