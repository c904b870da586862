"""The run's long tables (``TableStream``): one row per meter, the same columns at any width.

Driven through a real RunEngine (bluesky composes and validates every document with
event_model), with plain rows: no meter is needed to test the table's shape.
"""

from __future__ import annotations

import math
from typing import Any

import bluesky.plan_stubs as bps
import pytest
from bluesky.utils import Msg

from plans._fly import SYNC_COLUMNS, sync_table
from smartmeter_ophyd.devices import MeterSummary, TableColumn, TableStream
from smartmeter_ophyd.readback import ReadbackError, meter_rows
from tests.run_engines import RunEngine

COLUMNS = {"meter": TableColumn("string"), "segment": TableColumn("integer"),
           "offset_s": TableColumn("number", "s"), "ok": TableColumn("boolean")}


def rows(n: int, segment: int) -> list[dict[str, Any]]:
    return [{"meter": f"m{i}", "segment": segment, "offset_s": None if i == 0 else 0.25 * i,
             "ok": i % 2 == 0} for i in range(n)]


def record(n: int, segments: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """A run holding the table of ``n`` meters, ``segments`` times; its documents."""
    table = TableStream("demo", COLUMNS, source="tests")
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})

    def plan() -> Any:
        yield from bps.open_run()
        yield from bps.declare_stream(table, name=table.name, collect=True)
        for segment in range(segments):
            table.add(rows(n, segment))
            yield Msg("collect", table, stream=False, return_payload=False, name=table.name)
        yield Msg("collect", table, stream=False, return_payload=False, name=table.name)
        yield from bps.close_run()

    engine(plan(), lambda name, doc: docs.append((name, doc)))
    return docs


def test_a_table_has_the_same_descriptor_at_any_width_and_one_page_per_collect() -> None:
    narrow, wide = record(1), record(50, segments=2)
    for docs in (narrow, wide):
        (descriptor,) = [d for n, d in docs if n == "descriptor"]
        assert set(descriptor["data_keys"]) == set(COLUMNS)
        assert descriptor["data_keys"]["offset_s"]["units"] == "s"
    (descriptor,) = [d for n, d in wide if n == "descriptor"]
    pages = [d for n, d in wide if n == "event_page"]
    assert len(pages) == 2  # the last collect had no rows: no page
    assert [len(p["data"]["meter"]) for p in pages] == [50, 50]
    assert [p["seq_num"][0] for p in pages] == [1, 51]
    table = meter_rows({k: pages[0]["data"][k] + pages[1]["data"][k] for k in COLUMNS})
    assert list(table) == [f"m{i}" for i in range(50)]
    assert [row["segment"] for row in table["m3"]] == [0, 1]
    assert math.isnan(table["m0"][0]["offset_s"])  # not known: NaN, never 0
    assert table["m3"][1] == {"meter": "m3", "segment": 1, "offset_s": 0.75, "ok": False}


def test_a_bad_row_names_the_meter_and_the_column_and_queues_nothing() -> None:
    table = TableStream("demo", COLUMNS, source="tests")
    good = rows(2, 0)
    with pytest.raises(ValueError, match=r"demo: m1: columns missing \['ok'\]"):
        table.add([good[0], {k: v for k, v in good[1].items() if k != "ok"}])
    with pytest.raises(ValueError, match=r"demo: m1: column 'segment': '0' is not an integer"):
        table.add([good[0], {**good[1], "segment": "0"}])
    with pytest.raises(ValueError, match=r"demo: m0: column 'offset_s': 'x' is not a number"):
        table.add([{**good[0], "offset_s": "x"}])
    assert not table.pending and list(table.collect_pages()) == []
    with pytest.raises(ValueError, match="needs a string column 'meter'"):
        TableStream("demo", {"segment": TableColumn("integer")}, source="tests")
    with pytest.raises(ValueError, match="dtype 'float'"):
        TableColumn("float")


def test_the_run_tables_have_fixed_columns_with_units() -> None:
    sync = sync_table().describe_collect()
    assert set(sync) == set(SYNC_COLUMNS)
    assert sync["gate_confidence_ms"]["units"] == "ms" and sync["host_offset_s"]["units"] == "s"
    summary = MeterSummary().describe_collect()
    assert {"meter", "segment", "received_samples", "stop_summary", "firmware_version"} <= set(
        summary)
    assert summary["start_ts"]["units"] == "s" and summary["explained"]["dtype"] == "boolean"


def test_meter_rows_needs_a_meter_column() -> None:
    with pytest.raises(ReadbackError, match="no 'meter' column"):
        meter_rows({"segment": [0]})
