"""The CLI's run summary of a run recorded before ``meter_summary`` and ``synchronization``
were tables: one wide event per segment with a key per meter and field.

The run is written through a real document path (a RunEngine, TiledWriter, the embedded
catalog) with the keys the plans used to write; the summary reads it back from the catalog.
"""

from __future__ import annotations

import json
import math
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from smartmeter_ophyd.cli._summary import format_summary, run_summary
from smartmeter_ophyd.storage import make_tiled_writer
from tests.run_engines import RunEngine

START_TS = 1_760_000_000.0


class Fixed:
    """A readable holding fixed values per read, as the plans' old records were."""

    def __init__(self, name: str, reads: list[dict[str, Any]]) -> None:
        self.name = name
        self.parent = None
        self._reads = reads
        self._read = 0

    def describe(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key, value in self._reads[0].items():
            dtype = ("string" if isinstance(value, str) else "boolean"
                     if isinstance(value, bool) else "integer" if isinstance(value, int)
                     else "number")
            out[key] = {"source": "old-layout", "dtype": dtype, "shape": []}
        return out

    def read(self) -> dict[str, dict[str, Any]]:
        values = self._reads[min(self._read, len(self._reads) - 1)]
        self._read += 1
        return {key: {"value": value, "timestamp": START_TS} for key, value in values.items()}

    def describe_configuration(self) -> dict[str, dict[str, Any]]:
        return {}

    def read_configuration(self) -> dict[str, dict[str, Any]]:
        return {}


def old_summary(received: int, sent: int, start_ts: float, notes: list[str]) -> dict[str, Any]:
    return {"m1_run_received_samples": received, "m1_run_missing_samples": sent - received,
            "m1_run_device_sent_samples": sent, "m1_run_gaps": int(sent > received),
            "m1_run_explained": True, "m1_run_start_ts": start_ts,
            "m1_run_stop_ts": start_ts + 1.0, "m1_run_hdf5_path": "",
            "m1_run_summary": json.dumps({"notes": notes})}


def test_a_run_recorded_before_the_tables_still_summarises(embedded_catalog) -> None:
    samples = Fixed("m1", [{"m1_time": START_TS + 0.5}])
    summary = Fixed("m1_run", [old_summary(8000, 8000, START_TS, ["first"]),
                               old_summary(7990, 8000, START_TS + 5, ["second"])])
    sync = Fixed("synchronization", [
        {"segment": 0, "host_offset_s": math.nan, "m1_sample_ntp_confidence_ms": 1.5},
        {"segment": 1, "host_offset_s": math.nan, "m1_sample_ntp_confidence_ms": 2.5}])
    md = {"plan_name": "synchronized_fly", "streams": {"m1": {"samples": "m1"}},
          "meters": {"m1": {"emulated": True}}}

    def plan() -> Any:
        yield from bps.trigger_and_read([samples], name="m1")
        for _segment in range(2):
            yield from bps.trigger_and_read([sync], name="synchronization")
            yield from bps.trigger_and_read([summary], name="meter_summary")

    engine = RunEngine({})
    engine.subscribe(make_tiled_writer(embedded_catalog.client))
    (uid,) = engine(bpp.run_wrapper(plan(), md=md))

    got = run_summary(embedded_catalog.client[uid])
    row = got["meters"]["m1"]
    assert (row["samples"], row["meter_sent"], row["missing"], row["gaps"]) == (
        15990, 16000, 10, 1)
    assert row["explained"] is True and row["start_ts"] == START_TS
    assert row["ntp_at_start_ms"] == 1.5 and row["notes"] == ["first", "second"]
    assert "15990" in format_summary(got)
