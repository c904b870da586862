"""DirectCatalogWriter against TiledWriter, and the journal format.

* catalog level: the documents of one run (a samples stream with a packet gap, its gaps
  stream, and event streams with float, int, bool, NaN and string values: as events, as one
  event page, and with the reserved key names ``time`` and ``seq_num``) written by
  ``make_tiled_writer`` and by :class:`DirectCatalogWriter` into two containers of one catalog
  give identical nodes: specs, metadata, structures, data sources and data (tables too);
* a declared external key that never gets data: ``TiledWriter`` has no node, the direct
  writer a node with zero rows (it creates nodes when resources arrive); both read as no gaps;
* a run with an array event key is refused, naming the key;
* the journal returns only complete records of a file that is still being written.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import time
import uuid
from typing import Any

import bluesky.plan_stubs as bps
import event_model
import numpy as np
import pytest

from smartmeter_ophyd.storage import (
    CatalogWriteError,
    DirectCatalogWriter,
    JournalReader,
    JournalWriter,
    make_tiled_writer,
    read_gaps,
    read_journal,
    replay_journal,
)
from tests.run_engines import RunEngine

from .test_run_roundtrip import TestMeter, fly


class Readings:
    """A plain bluesky Readable with fixed values of every scalar type a table holds."""

    def __init__(self, name: str, values: dict[str, Any], *, prefix: bool = True) -> None:
        self.name, self.parent, self._values = name, None, values
        self._prefix = f"{name}_" if prefix else ""

    def describe(self) -> dict[str, Any]:
        out = {}
        for key, value in self._values.items():
            if isinstance(value, bool):
                kind, numpy = "boolean", "|b1"
            elif isinstance(value, int):
                kind, numpy = "integer", "<i8"
            elif isinstance(value, float):
                kind, numpy = "number", "<f8"
            elif isinstance(value, str):
                kind, numpy = "string", "<U0"
            else:
                kind, numpy = "array", "<f8"
            shape = list(np.shape(value))
            out[f"{self._prefix}{key}"] = {"source": "test", "dtype": kind, "shape": shape,
                                         "dtype_numpy": numpy}
        return out

    def read(self) -> dict[str, Any]:
        now = time.time()
        return {f"{self._prefix}{k}": {"value": v, "timestamp": now}
                for k, v in self._values.items()}

    def describe_configuration(self) -> dict[str, Any]:
        return {}

    def read_configuration(self) -> dict[str, Any]:
        return {}


def run_with_events(meter: TestMeter, readings: Readings, *more: Readings) -> Any:
    """A fly of ``meter``, then 3 events of ``readings`` (stream ``summary``) and of each of
    ``more`` (a stream named after it)."""
    def plan() -> Any:
        uid = yield from fly(meter)
        return uid

    def with_events() -> Any:
        yield from bps.open_run(md={"meter": meter.name, "purpose": "direct writer test"})
        yield from bps.declare_stream(meter, name="meter", collect=True)
        yield from bps.declare_stream(meter.gaps, name="meter_gaps", collect=True)
        yield from bps.kickoff(meter, wait=True)
        yield from bps.collect_while_completing([meter], [meter], flush_period=0.02,
                                                stream_name="meter")
        yield from bps.collect(meter.gaps, name="meter_gaps")
        for _ in range(3):
            yield from bps.trigger_and_read([readings], name="summary")
        for other in more:
            for _ in range(3):
                yield from bps.trigger_and_read([other], name=other.name)
        yield from bps.close_run()

    return with_events()


def record(plan: Any) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    engine(plan)
    return docs


def paged(docs: list[tuple[str, dict[str, Any]]], stream: str) -> list[tuple[str, dict[str, Any]]]:
    """The documents with the events of ``stream`` packed into one event page (at the place
    of its first event), as the RunEngine emits a collected stream."""
    descriptor = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == stream)
    events = [d for n, d in docs if n == "event" and d["descriptor"] == descriptor]
    page = dict(event_model.pack_event_page(*events))
    out, placed = [], False
    for name, doc in docs:
        if name == "event" and doc["descriptor"] == descriptor:
            if not placed:
                out.append(("event_page", page))
                placed = True
            continue
        out.append((name, doc))
    return out


def summary(run: Any) -> dict[str, Any]:
    """Everything a reader sees of a run, minus database ids."""
    out: dict[str, Any] = {"metadata": dict(run.metadata), "specs": list(run.specs)}
    for stream in run:
        node = run[stream]
        out[stream] = {"metadata": dict(node.metadata), "specs": list(node.specs)}
        base = getattr(node, "base", node)  # the stream's own children, not its columns
        for key in base:
            child = base[key]
            sources = []
            for ds in child.data_sources():
                d = dataclasses.asdict(ds)
                d.pop("id", None)
                for asset in d.get("assets", []):
                    asset.pop("id", None)
                    if d["management"] != "external":
                        asset.pop("data_uri", None)  # storage tables are named per node
                d.get("parameters", {}).pop("table_name", None)
                d.get("parameters", {}).pop("dataset_id", None)
                sources.append(d)
            if child.structure_family == "table":
                data = child.read().to_dict("list")
            else:
                data = np.asarray(child[:])
            out[stream][key] = (child.structure_family, child.structure(), sources,
                                dict(child.metadata), data)
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


async def write_direct(catalog: Any, container: str, docs: list[tuple[str, dict[str, Any]]]) -> None:
    from tiled.catalog import from_uri

    config = catalog.writer_config
    tree = from_uri(config["uri"], writable_storage=config["writable_storage"],
                    readable_storage=config["readable_storage"])
    await tree.startup()
    try:
        root = await tree.lookup_adapter([container])
        writer = DirectCatalogWriter(root, live_period=0.0)
        for i, (name, doc) in enumerate(docs):
            await writer.process(name, copy.deepcopy(doc))
            if i % 7 == 0:  # live updates in between, as the writer process does
                await writer.flush_live()
        assert writer.open_runs == ()
    finally:
        await tree.shutdown()


def test_same_catalog_as_tiled_writer(embedded_catalog) -> None:
    meter = TestMeter(name="dw", directory=embedded_catalog.data_directory, seed=11)
    readings = Readings("sum", {"count": 7, "ok": True, "level": 1.5, "missing": math.nan,
                                "label": "phase L2"})
    page = Readings("page", {"n": 3, "on": False, "x": -0.25, "nan": math.nan, "s": "L1"})
    reserved = Readings("reserved", {"time": 2.5, "seq_num": 4, "other": 1.0}, prefix=False)
    docs = paged(record(run_with_events(meter, readings, page, reserved)), "page")
    assert [n for n, d in docs].count("event_page") == 1
    uid = docs[0][1]["uid"]
    assert sum(1 for n, _ in docs if n == "stream_datum") > 10

    client = embedded_catalog.client
    suffix = uuid.uuid4().hex[:8]
    stock_root = client.create_container(f"tw-{suffix}")
    direct_root = client.create_container(f"direct-{suffix}")
    writer = make_tiled_writer(stock_root)
    for name, doc in docs:
        writer(name, copy.deepcopy(doc))
    asyncio.run(write_direct(embedded_catalog, f"direct-{suffix}", docs))

    stock = summary(stock_root.include_data_sources()[uid])
    direct = summary(direct_root.include_data_sources()[uid])
    assert set(stock) == {"metadata", "specs", "meter", "meter_gaps", "summary", "page",
                          "reserved"}
    assert stock["summary"]["internal"][4]["sum_ok"] == [True, True, True]
    assert stock["page"]["internal"][4]["page_x"] == [-0.25] * 3
    assert stock["reserved"]["internal"][4]["time_"] == [2.5] * 3  # renamed by the normalizer
    assert stock["meter_gaps"]  # the packet gap is there
    assert_same(direct, stock)


def test_a_stream_without_data_reads_as_empty_either_way(embedded_catalog) -> None:
    meter = TestMeter(name="ng", directory=embedded_catalog.data_directory, seed=12)
    docs = record(fly(meter))
    uid = docs[0][1]["uid"]
    gaps_desc = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "meter_gaps")
    docs = [(n, d) for n, d in docs if not (n == "stream_datum" and d["descriptor"] == gaps_desc)]
    client = embedded_catalog.client
    suffix = uuid.uuid4().hex[:8]
    stock_root = client.create_container(f"tw-{suffix}")
    direct_root = client.create_container(f"direct-{suffix}")
    writer = make_tiled_writer(stock_root)
    for name, doc in docs:
        writer(name, copy.deepcopy(doc))
    asyncio.run(write_direct(embedded_catalog, f"direct-{suffix}", docs))
    stock, direct = stock_root[uid], direct_root[uid]
    assert list(stock["meter_gaps"].base) == []
    assert sorted(direct["meter_gaps"].base) == sorted(
        f"ng_gap_{f}" for f in ("sample_index", "expected_packet", "received_packet",
                                "missing_samples"))
    assert all(direct["meter_gaps"].base[k].shape == (0,) for k in direct["meter_gaps"].base)
    for run in (stock, direct):
        assert all(len(v) == 0 for v in read_gaps(run, "meter_gaps").values())
    assert_same(summary(direct_root.include_data_sources()[uid])["meter"],
                summary(stock_root.include_data_sources()[uid])["meter"])


def test_array_event_key_is_refused_naming_it(embedded_catalog) -> None:
    readings = Readings("spec", {"counts": [1.0] * 100})

    def plan() -> Any:
        yield from bps.open_run()
        yield from bps.trigger_and_read([readings], name="primary")
        yield from bps.close_run()

    docs = record(plan())
    container = f"refused-{uuid.uuid4().hex[:8]}"
    embedded_catalog.client.create_container(container)
    with pytest.raises(CatalogWriteError, match="spec_counts.*shape \\[100\\]"):
        asyncio.run(write_direct(embedded_catalog, container, docs))


def test_journal_returns_complete_records_only(tmp_path) -> None:
    path = tmp_path / "run.docs"
    docs = [
        ("start", {"uid": "u1", "time": 1.0, "values": np.arange(3, dtype=np.int32)}),
        ("event", {"uid": "e1", "data": {"x": np.float32(0.5), "flag": np.bool_(True)}}),
        ("stop", {"uid": "s1", "run_start": "u1", "exit_status": "success"}),
    ]
    with JournalWriter(path) as journal:
        journal.append(*docs[0])
        journal.append(*docs[1])
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the second record is torn
    with JournalReader(path) as reader:
        first = reader.read()
        assert [n for n, _ in first] == ["start"]
        assert first[0][1]["values"] == [0, 1, 2]  # numpy became plain lists and scalars
        with open(path, "ab") as f:
            f.write(whole[-5:])
        second = reader.read()
        assert second == [("event", {"uid": "e1", "data": {"x": 0.5, "flag": True}})]
        with JournalWriter(path) as journal:
            journal.append(*docs[2])
            journal.sync()
        assert [n for n, _ in reader.read()] == ["stop"]
        assert reader.read() == []
    assert [n for n, _ in read_journal(path)] == ["start", "event", "stop"]
    seen: list[str] = []
    assert replay_journal(path, lambda name, doc: seen.append(name)) == 3 and len(seen) == 3
    with JournalWriter(tmp_path / "bad.docs") as journal, pytest.raises(TypeError, match="object"):
        journal.append("event", {"data": {"x": object()}})
