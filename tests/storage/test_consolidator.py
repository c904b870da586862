"""CompactHDF5Consolidator against upstream's HDF5Consolidator.

* unit level: the same StreamDatum sequences (in order, with a seq_num skip, overlapping,
  out of order, empty) give the same shape, chunks, patches, data source, ``has_skips`` and
  seq_num -> index mapping;
* catalog level: the same documents of a run with a packet gap written by a stock TiledWriter
  and by :func:`make_tiled_writer` into two containers of one catalog give identical
  structures, data sources and data;
* memory: 10 M indices of StreamDatum leave the consolidator's footprint flat.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import tracemalloc
import uuid
from typing import Any

import numpy as np
import pytest
from bluesky_tiled_plugins import TiledWriter
from bluesky_tiled_plugins.writing import consolidators as upstream

from smartmeter_ophyd.storage import (
    HDF5_MIMETYPE,
    CompactHDF5Consolidator,
    install_compact_consolidator,
    make_tiled_writer,
    uninstall_compact_consolidator,
)
from tests.run_engines import RunEngine

from .test_run_roundtrip import TestMeter, fly


def _docs(chunk: int | None = 4096) -> tuple[dict[str, Any], dict[str, Any]]:
    params: dict[str, Any] = {"dataset": "/v_l1", "swmr": True}
    if chunk:
        params["chunk_shape"] = [chunk]
    sres = {
        "uid": "sres-1",
        "data_key": "m_v_l1",
        "mimetype": HDF5_MIMETYPE,
        "uri": "file://localhost/tmp/meter.h5",
        "parameters": params,
        "run_start": "start-1",
    }
    desc = {
        "uid": "desc-1",
        "data_keys": {
            "m_v_l1": {
                "source": "test",
                "dtype": "number",
                "dtype_numpy": "<f4",
                "shape": [],
                "external": "STREAM:",
            }
        },
    }
    return sres, desc


def _datum(seq: tuple[int, int], idx: tuple[int, int]) -> dict[str, Any]:
    return {
        "uid": uuid.uuid4().hex,
        "stream_resource": "sres-1",
        "descriptor": "desc-1",
        "seq_nums": {"start": seq[0], "stop": seq[1]},
        "indices": {"start": idx[0], "stop": idx[1]},
    }


SEQUENCES = {
    "in order": [((1, 101), (0, 100)), ((101, 151), (100, 150)), ((151, 152), (150, 151))],
    "seq skip": [((1, 101), (0, 100)), ((111, 161), (100, 150))],
    "no seq_nums": [((0, 0), (0, 100)), ((0, 0), (100, 200))],
    "overlap": [((1, 101), (0, 100)), ((51, 151), (100, 200)), ((20, 30), (200, 210))],
    "short seq": [((1, 11), (0, 100)), ((11, 211), (100, 200))],
    "empty": [((5, 5), (0, 0))],
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_same_state_as_upstream(name: str) -> None:
    sres, desc = _docs()
    stock = upstream.HDF5Consolidator(copy.deepcopy(sres), copy.deepcopy(desc))
    compact = CompactHDF5Consolidator(copy.deepcopy(sres), copy.deepcopy(desc))
    assert type(stock) is upstream.HDF5Consolidator
    assert type(compact) is CompactHDF5Consolidator
    for seq, idx in SEQUENCES[name]:
        doc = _datum(seq, idx)
        assert compact.consume_stream_datum(doc) == stock.consume_stream_datum(doc)
        assert compact.has_skips == stock.has_skips
        assert compact.mapped_seqnums == len(stock._seqnums_to_indices_map)
    assert compact._seqnums_to_indices_map == stock._seqnums_to_indices_map
    assert compact.shape == stock.shape
    assert compact.chunks == stock.chunks
    assert compact.structure() == stock.structure()
    assert compact.get_data_source() == stock.get_data_source()


def test_contiguous_datums_merge_into_one_run_and_a_skip_starts_another() -> None:
    sres, desc = _docs()
    compact = CompactHDF5Consolidator(sres, desc)
    for k in range(10):
        compact.consume_stream_datum(_datum((1 + 100 * k, 101 + 100 * k), (100 * k, 100 * k + 100)))
    assert compact.seqnum_runs == ((1, 0, 1000),)
    compact.consume_stream_datum(_datum((1101, 1201), (1000, 1100)))
    assert compact.seqnum_runs == ((1, 0, 1000), (1101, 1000, 100))
    assert not compact.has_skips
    compact.consume_stream_datum(_datum((0, 0), (1100, 1200)))
    assert compact.has_skips


def test_install_is_explicit_idempotent_and_reversible() -> None:
    uninstall_compact_consolidator()
    try:
        assert upstream.CONSOLIDATOR_REGISTRY[HDF5_MIMETYPE] is upstream.HDF5Consolidator
        install_compact_consolidator()
        install_compact_consolidator()
        assert upstream.CONSOLIDATOR_REGISTRY[HDF5_MIMETYPE] is CompactHDF5Consolidator
        sres, desc = _docs()
        assert isinstance(upstream.consolidator_factory(sres, desc), CompactHDF5Consolidator)
        # multi-file (templated) HDF5 stays with upstream's multipart consolidator
        sres["parameters"]["template"] = "meter_%d.h5"
        sres["parameters"].pop("chunk_shape")
        assert isinstance(
            upstream.consolidator_factory(sres, desc), upstream.MultipartHDF5Consolidator
        )
    finally:
        install_compact_consolidator()


def test_memory_stays_flat_for_10_million_indices() -> None:
    sres, desc = _docs(chunk=262144)
    compact = CompactHDF5Consolidator(sres, desc)
    step = 100_000
    datums = [_datum((1 + i, 1 + i + step), (i, i + step)) for i in range(0, 10_000_000, step)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for doc in datums:
            compact.consume_stream_datum(doc)
        assert not compact.has_skips
        after = tracemalloc.take_snapshot()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    retained = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert compact.shape == (10_000_000,)
    assert compact.seqnum_runs == ((1, 0, 10_000_000),)
    # upstream keeps a 10 M-entry dict here (~1 GB); chunks tuple (39 ints) is what remains
    assert retained < 64_000, retained
    assert peak < 1_000_000, peak


def _node_summary(node: Any) -> Any:
    """Structure, data sources (minus ids) and data of every array under a run."""
    out: dict[str, Any] = {}
    for stream in node:
        for key in node[stream]:
            arr = node[stream][key]
            sources = []
            for ds in arr.data_sources():
                d = dataclasses.asdict(ds)
                d.pop("id", None)
                for asset in d.get("assets", []):
                    asset.pop("id", None)
                sources.append(d)
            out[f"{stream}/{key}"] = (arr.structure(), sources, np.asarray(arr[:]))
    return out


def test_catalog_identical_to_stock_consolidator_for_run_with_gap(embedded_catalog) -> None:
    client = embedded_catalog.client
    docs: list[tuple[str, dict[str, Any]]] = []
    meter = TestMeter(name="cmp", directory=embedded_catalog.data_directory, seed=7)
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    (uid,) = engine(fly(meter))
    assert any(n == "stream_datum" for n, _ in docs)

    suffix = uuid.uuid4().hex[:8]
    stock_root = client.create_container(f"stock-{suffix}")
    compact_root = client.create_container(f"compact-{suffix}")
    uninstall_compact_consolidator()
    try:
        stock_writer = TiledWriter(stock_root)
        for name, doc in docs:
            stock_writer(name, copy.deepcopy(doc))
    finally:
        install_compact_consolidator()
    compact_writer = make_tiled_writer(compact_root)
    for name, doc in docs:
        compact_writer(name, copy.deepcopy(doc))

    stock = _node_summary(stock_root[uid])
    compact = _node_summary(compact_root[uid])
    assert stock.keys() == compact.keys() and any("gap" in k for k in stock)
    for key in stock:
        s_struct, s_sources, s_data = stock[key]
        c_struct, c_sources, c_data = compact[key]
        assert c_struct == s_struct, key
        assert c_sources == s_sources, key
        assert c_data.dtype == s_data.dtype and np.array_equal(c_data, s_data), key
    assert stock_root[uid].metadata == compact_root[uid].metadata
