"""The summary table printed after ``smartmeter record`` (and by ``smartmeter runs RUN``).

Everything comes from the run as the catalog holds it (start document, ``meter_summary`` and
``synchronization`` tables, the samples), so the table says what was stored, not what the
process believed.  Columns per meter: samples stored / sent by the meter, samples declared
missing and in how many gaps, the NTP gate's confidence and the confidence of the sync the
meter ran at the start (§6.4), and the meter's real start (stop reply ``start_ts``) relative
to the earliest.  A run paused and resumed has one row per meter and segment in its tables:
counts are summed over the segments (a count the meter never gave, -1, makes the sum
unknown), ``accounted`` needs every segment accounted, and the start and the sync at the
start are the first segment's.  Runs recorded before these were tables (one wide event per
segment, keys ``<meter>_run_<field>`` and ``<meter>_<field>``) are read as well.  Below it: the start spread and, for two or more meters recording L1
voltage, the residual offset between their waveforms (:func:`smartmeter_ophyd.timing.align`
over the first seconds), which checks the clocks against the grid itself.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any, Final

import numpy as np

from ._common import table

ALIGN_SECONDS: Final = 10.0
WIDE_FIELDS: Final = ("received_samples", "missing_samples", "device_sent_samples", "gaps",
                      "explained", "start_ts", "summary", "sample_ntp_confidence_ms")
"""What the summary reads of a run recorded before the tables."""


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:g}"


def _read(run: Any, stream: str) -> Any:
    from ..storage import read_event_table

    try:
        return read_event_table(run, stream)
    except KeyError:  # no such stream, or declared and never written
        return None


def _rows(run: Any, stream: str, meters: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The run's per-meter table ``stream`` as rows per meter ({} if it has none)."""
    from ..readback import meter_rows

    table = _read(run, stream)
    if table is None:
        return {}
    if "meter" in table:
        return meter_rows(table)
    return _wide_rows(table, meters, "{}_run_" if stream == "meter_summary" else "{}_")


def _wide_rows(table: Any, meters: list[str], prefix: str) -> dict[str, list[dict[str, Any]]]:
    """A run recorded before the tables: one event per segment, a key per meter and field."""
    n = len(table)
    out: dict[str, list[dict[str, Any]]] = {}
    for meter in meters:
        keys = {field: prefix.format(meter) + field for field in WIDE_FIELDS}
        columns = {field: np.asarray(table[key]).tolist() for field, key in keys.items()
                   if key in table}
        if columns:
            out[meter] = [{field: values[i] for field, values in columns.items()}
                          for i in range(n)]
    return out


def _total(rows: list[dict[str, Any]], column: str) -> int:
    """``column`` summed over a meter's segments; -1 if any is unknown (-1) or none stored."""
    values = [int(_num(row.get(column, -1))) for row in rows]
    return -1 if not values or min(values) < 0 else sum(values)


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes: list[str] = []
    for row in rows:
        try:
            detail = json.loads(row.get("summary") or "{}")
        except ValueError:
            detail = {}
        notes += [n for n in detail.get("notes", []) if n not in notes]
    return notes


def run_summary(run: Any) -> dict[str, Any]:
    """The summary as data (what ``--json`` prints)."""
    from ..readback import run_meters, time_source

    start, stop = run.start, run.stop or {}
    meters = run_meters(run)
    summary = _rows(run, "meter_summary", meters)
    sync = _rows(run, "synchronization", meters)
    gate = (start.get("synchronization") or {}).get("gate") or {}
    rows = {}
    for m in meters:
        mine = summary.get(m, [])
        first = mine[0] if mine else {}
        confidences = (gate.get(m) or {}).get("confidences_ms") or []
        rows[m] = {
            "samples": _total(mine, "received_samples") if mine
            else int(run[m][f"{m}_time"].shape[0]),
            "meter_sent": _total(mine, "device_sent_samples"),
            "missing": _total(mine, "missing_samples"),
            "gaps": _total(mine, "gaps"),
            "explained": bool(mine) and all(bool(row.get("explained")) for row in mine),
            "start_ts": _num(first.get("start_ts")),
            "ntp_gate_ms": _num(confidences[-1]) if confidences and confidences[-1] is not None
            else math.nan,
            "ntp_at_start_ms": _num(sync[m][0].get("sample_ntp_confidence_ms")) if sync.get(m)
            else math.nan,
            "emulated": bool((start.get("meters", {}).get(m) or {}).get("emulated")),
            "time_source": time_source(run, m),
            "notes": _notes(mine),
        }
    starts = [r["start_ts"] for r in rows.values() if r["start_ts"] > 0]
    spread = (max(starts) - min(starts)) * 1e3 if len(starts) > 1 else math.nan
    return {
        "uid": start["uid"],
        "plan": start.get("plan_name"),
        "time": start.get("time"),
        "exit_status": stop.get("exit_status", "running or lost"),
        "reason": stop.get("reason", ""),
        "meters": rows,
        "start_spread_ms": spread,
        "alignment": alignment_residual(run, meters),
    }


def _recorded_alignment(run: Any) -> dict[str, Any] | None:
    """The run's own ``alignment`` stream (``synchronized_fly`` measures it at the end)."""
    table = _read(run, "alignment")
    if table is None or "alignment_meter" not in table or not len(table):
        return None
    kind = np.asarray(table["alignment_kind"].values).astype(str)
    meter = np.asarray(table["alignment_meter"].values).astype(str)
    offset = np.asarray(table["alignment_offset_s"].values, dtype=np.float64)
    uncertainty = np.asarray(table["alignment_uncertainty_s"].values, dtype=np.float64)
    pieces = kind == "piece"
    if not pieces.any():
        return None
    out: dict[str, Any] = {"reference": str(table["alignment_reference"].values[0]),
                           "seconds": None, "offsets_ms": {}, "uncertainty_ms": {},
                           "source": "the run's alignment stream"}
    for name in dict.fromkeys(meter[pieces]):
        rows = pieces & (meter == name)
        out["offsets_ms"][name] = float(np.median(offset[rows])) * 1e3
        out["uncertainty_ms"][name] = float(np.max(uncertainty[rows])) * 1e3
    return out


def alignment_residual(run: Any, meters: list[str]) -> dict[str, Any] | None:
    """Median waveform offset of each meter's L1 voltage against the first meter's (ms).

    From the run's ``alignment`` stream when it has one, else measured here on the first
    :data:`ALIGN_SECONDS` seconds read back from the catalog.
    """
    from ..readback import SYNCED_SOURCE, first_last_time, meter_data
    from ..timing import AlignmentError, Waveform, align

    if len(meters) < 2:
        return None
    recorded = _recorded_alignment(run)
    if recorded is not None:
        return recorded
    spans = {m: first_last_time(run, m) for m in meters}
    if any(s is None for s in spans.values()):
        return None
    t0 = max(s[0] for s in spans.values() if s is not None)
    waves = {}
    try:
        for m in meters:
            ds = meter_data(run, m, t0, t0 + ALIGN_SECONDS, channels=["v_l1"])
            if ds.attrs["time_source"] != SYNCED_SOURCE or ds.sizes["time"] < 100:
                return None
            waves[m] = Waveform(m, np.asarray(ds["time"].values, dtype=np.float64),
                                np.asarray(ds["v_l1"].values))
        results = align(waves, meters[0])
    except (AlignmentError, KeyError, ValueError) as exc:
        return {"reference": meters[0], "error": str(exc)}
    out: dict[str, Any] = {"reference": meters[0], "seconds": ALIGN_SECONDS, "offsets_ms": {},
                           "uncertainty_ms": {}, "source": f"first {ALIGN_SECONDS:g} s"}
    for m, a in results.items():
        if len(a):
            out["offsets_ms"][m] = float(np.median(a.offset_s)) * 1e3
            out["uncertainty_ms"][m] = float(np.max(a.uncertainty_s)) * 1e3
    return out


def format_summary(s: dict[str, Any]) -> str:
    rows = []
    t_min = min((r["start_ts"] for r in s["meters"].values() if r["start_ts"] > 0),
                default=math.nan)
    for name, r in s["meters"].items():
        sent = "?" if r["meter_sent"] < 0 else str(r["meter_sent"])
        start = ("counted from 0" if r["start_ts"] == 0 else
                 "-" if math.isnan(r["start_ts"]) else f"+{(r['start_ts'] - t_min) * 1e3:.1f} ms")
        rows.append([name + (" (emulated)" if r["emulated"] else ""), str(r["samples"]), sent,
                     f"{r['missing']} in {r['gaps']}" if r["missing"] >= 0 else "?",
                     _ms(r["ntp_gate_ms"]), _ms(r["ntp_at_start_ms"]), start,
                     "yes" if r["explained"] else "NO"])
    when = dt.datetime.fromtimestamp(s["time"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") \
        if s.get("time") else "?"
    lines = [f"run {s['uid']}  {s['plan']}  {when}  exit status: {s['exit_status']}"
             + (f" ({s['reason']})" if s["reason"] else "")]
    lines.append(table(rows, ["meter", "samples", "meter sent", "missing in gaps",
                              "NTP gate ms", "NTP at start ms", "start", "accounted"]))
    if not math.isnan(s["start_spread_ms"]):
        lines.append(f"start spread: {s['start_spread_ms']:.3f} ms (meters' real starts, "
                     "stop replies' start_ts)")
    a = s.get("alignment")
    if a and a.get("offsets_ms"):
        parts = [f"{m} {v * 1e3:+.1f} µs (±{a['uncertainty_ms'][m] * 1e3:.1f} µs)"
                 for m, v in a["offsets_ms"].items()]
        lines.append(f"alignment residual vs {a['reference']} (L1 voltage waveforms, "
                     f"{a['source']}): " + ", ".join(parts))
    elif a and a.get("error"):
        lines.append(f"alignment residual: not available ({a['error']})")
    for name, r in s["meters"].items():
        if r["start_ts"] == 0:
            lines.append(f"note: {name} had no NTP time (startTs 0.000, §6.1): its samples count "
                         "from 0, not unix time; point it at a time server: smartmeter set "
                         "HOST --time-server NTP_HOST")
    return "\n".join(lines)
