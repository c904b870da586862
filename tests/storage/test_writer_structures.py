"""The catalog writer keeps only the ``structures`` rows that data sources reference.

Why: every shape update of an array node points its data source at a new content-addressed
``structures`` row (its JSON lists every chunk); the rows replaced were never deleted, so
``catalog.db`` grew with the square of a run's length.  :class:`DirectCatalogWriter` now
deletes, in the same transaction, the replaced rows no data source references any more.  Rows
are shared (identical structures have one row: the keys of a meter, meters of one shape, an
earlier run that ended where this one passes) and the foreign key cascades - deleting a
referenced row would delete its data sources - so the reads below check nothing was lost.

A run of three meters (two with identical chunks, one with another size; real data in HDF5
files) is written StreamDatum by StreamDatum, a flush after each, by the writer's own code into
a private embedded catalog: through the bulk statements, and - when m2 starts a new file, a new
asset - through the adapter's per-node ``put_data_source``.  After the first run, a second one
of the same chunks passes through the first one's final structures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sqlite3
import uuid
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow
from hypothesis import given
from hypothesis import strategies as st
from tiled.catalog.utils import compute_structure_id
from tiled.structures.array import ArrayStructure, BuiltinDtype, Endianness, Kind
from tiled.structures.table import TableStructure

from smartmeter_ophyd.storage import DirectCatalogWriter, setup_embedded_catalog
from smartmeter_ophyd.storage._direct import _structure_dict

KEYS = ("v_l1", "i_l1")  # one structure per meter: both keys float64, same rows
ROWS = {"m0": 300, "m1": 300, "m2": 420}  # per StreamDatum: m0 and m1 share structures
CHUNK = 1024  # HDF5 chunk rows: the structure's chunk list grows with the run

Doc = tuple[str, dict[str, Any]]


def _values(meter: str, key: str, rows: range) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64) * (1 + KEYS.index(key)) + int(meter[1:]) * 1e6


class Run:
    """One fly of the meters of ``ROWS``: its documents, and its data in real HDF5 files.

    With ``roll``, m2 starts a new file every ``roll`` StreamDatums (a new StreamResource per
    key: the node gets one more asset, which the writer passes to ``put_data_source``)."""

    def __init__(self, directory: Path, datums: int, roll: int | None = None) -> None:
        self.uid = str(uuid.uuid4())
        self.datums = datums
        self.descriptors = {m: str(uuid.uuid4()) for m in ROWS}
        self.parts = {m: [0] for m in ROWS}  # meter -> first datum of each of its files
        if roll:
            self.parts["m2"] = list(range(0, datums, roll))
        self.resources = {(m, k, first): str(uuid.uuid4())
                          for m, firsts in self.parts.items() for k in KEYS for first in firsts}
        self.files = {(m, first): directory / f"{m}-{first}-{self.uid}.h5"
                      for m, firsts in self.parts.items() for first in firsts}
        for (meter, first), path in self.files.items():
            firsts = [*self.parts[meter], datums]
            last = firsts[firsts.index(first) + 1]
            with h5py.File(path, "w", libver="latest") as f:
                for key in KEYS:
                    rows = range(first * ROWS[meter], last * ROWS[meter])
                    f.create_dataset(key, data=_values(meter, key, rows), chunks=(CHUNK,))

    def rows(self, meter: str) -> int:
        return ROWS[meter] * self.datums

    def opening(self) -> list[Doc]:
        docs: list[Doc] = [("start", {"uid": self.uid, "time": 1.0e9, "plan_name": "fly"})]
        for meter, desc in self.descriptors.items():
            docs.append(("descriptor", {
                "uid": desc, "run_start": self.uid, "time": 1.0e9, "name": meter,
                "data_keys": {f"{meter}_{k}": {"source": "test", "dtype": "number", "shape": [],
                                               "external": "STREAM:"} for k in KEYS},
                "object_keys": {meter: [f"{meter}_{k}" for k in KEYS]}, "configuration": {},
            }))
        return docs + self._resources(0)

    def _resources(self, n: int) -> list[Doc]:
        return [("stream_resource", {
            "uid": sres, "data_key": f"{meter}_{key}", "mimetype": "application/x-hdf5",
            "uri": f"file://localhost{self.files[meter, first]}",
            "parameters": {"dataset": f"/{key}", "swmr": True, "chunk_shape": [CHUNK]},
            "run_start": self.uid,
        }) for (meter, key, first), sres in self.resources.items() if first == n]

    def datum(self, n: int) -> list[Doc]:
        """The ``n``-th StreamDatum of every key (after the resources of files that start)."""
        docs = self._resources(n) if n else []
        for meter, firsts in self.parts.items():
            first = max(f for f in firsts if f <= n)
            rows = ROWS[meter]
            for key in KEYS:
                sres = self.resources[meter, key, first]
                docs.append(("stream_datum", {
                    "uid": f"{sres}/{n}", "stream_resource": sres,
                    "descriptor": self.descriptors[meter],
                    "seq_nums": {"start": 1 + n * rows, "stop": 1 + (n + 1) * rows},
                    "indices": {"start": n * rows, "stop": (n + 1) * rows},
                }))
        return docs

    def stop(self) -> Doc:
        return ("stop", {"uid": str(uuid.uuid4()), "run_start": self.uid, "time": 1.0e9 + 9,
                         "exit_status": "success", "reason": "", "num_events": {}})


def _catalog_db(directory: Path) -> None:
    """An empty catalog database, made in this process as ``tiled catalog init`` makes one
    (``from_uri(init_if_not_exists=True)`` runs that in a subprocess: 3 s)."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import initialize_database

    uri = f"sqlite+aiosqlite:///{directory / 'catalog.db'}"

    async def create() -> None:
        engine = create_async_engine(uri)
        try:
            await initialize_database(engine)
        finally:
            await engine.dispose()

    directory.mkdir(parents=True)
    asyncio.run(create())
    with warnings.catch_warnings():  # alembic on tiled's alembic.ini (not this project's)
        warnings.filterwarnings("ignore", "No path_separator found", DeprecationWarning)
        stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, uri)


def _structures(database: Path) -> tuple[set[str], set[str]]:
    """The ids of the ``structures`` rows, and those data sources reference (read by SQL)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = {r for (r,) in db.execute("SELECT id FROM structures")}
        referenced = {r for (r,) in db.execute(
            "SELECT DISTINCT structure_id FROM data_sources WHERE structure_id IS NOT NULL"
        )}
    return rows, referenced


def _array_structures(database: Path, run_uid: str) -> dict[str, str]:
    """Array key -> structure id of one run's data sources."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return dict(db.execute(
            "SELECT n.key, d.structure_id FROM data_sources d JOIN nodes n ON n.id = d.node_id "
            "JOIN nodes s ON s.id = n.parent JOIN nodes r ON r.id = s.parent "
            "WHERE r.key = ? AND d.structure_family = 'array'", (run_uid,)
        ).fetchall())


def _assets(database: Path, run_uid: str, key: str) -> int:
    """How many files back one array of a run."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM data_source_asset_association a "
            "JOIN data_sources d ON d.id = a.data_source_id JOIN nodes n ON n.id = d.node_id "
            "JOIN nodes s ON s.id = n.parent JOIN nodes r ON r.id = s.parent "
            "WHERE r.key = ? AND n.key = ?", (run_uid, key)
        ).fetchone()
    return int(count)


async def _write(config: dict[str, Any], runs: list[Run], database: Path,
                 watch: dict[tuple[int, int], Any]) -> None:
    """Write the runs one after the other, a flush after every StreamDatum; after flush
    ``n`` of run ``i``, ``watch[i, n] = watch[i, n](database)``."""
    from tiled.catalog import from_uri

    tree = from_uri(**config)
    await tree.startup()
    try:
        writer = DirectCatalogWriter(tree, live_period=0.0)
        for i, run in enumerate(runs):
            for name, doc in run.opening():
                await writer.process(name, doc)
            for n in range(run.datums):
                for name, doc in run.datum(n):
                    await writer.process(name, doc)
                await writer.flush_live(force=True)  # as the writer process between batches
                if (i, n) in watch:
                    watch[i, n] = watch[i, n](database)
            await writer.process(*run.stop())
            await writer.flush_live(force=True)
    finally:
        await tree.shutdown()


def test_only_referenced_structures_stay(tmp_path: Path) -> None:
    directory = tmp_path / "catalog"
    _catalog_db(directory)
    catalog = setup_embedded_catalog(directory, f"smartmeter-structures-{os.getpid()}",
                                     profiles_dir=tmp_path / "profiles")
    database = directory / "catalog.db"
    first = Run(catalog.data_directory, 12, roll=4)
    second = Run(catalog.data_directory, 20, roll=4)
    watch: dict[tuple[int, int], Any] = {
        (0, 5): _structures, (1, 5): _structures,
        (1, first.datums - 1): lambda db: _array_structures(db, second.uid),
    }
    try:
        asyncio.run(_write(catalog.writer_config, [first, second], database, watch))
        rows, referenced = _structures(database)
        # Old code: a row per shape ever written (~45 here), none deleted.
        assert rows == referenced, f"{len(rows - referenced)} unreferenced structures rows"
        for i in (0, 1):  # and while the run goes on
            assert watch[i, 5][0] == watch[i, 5][1], watch[i, 5]
        # The premise: rows are shared.  Within each run both keys of a meter, and m0 with m1,
        # have one row; m2 another ...
        finals = [_array_structures(database, run.uid) for run in (first, second)]
        for ids in finals:
            assert len(ids) == 2 * len(ROWS), ids
            assert len({ids[f"{m}_{k}"] for m in ("m0", "m1") for k in KEYS}) == 1, ids
            assert ids["m2_v_l1"] == ids["m2_i_l1"] != ids["m0_v_l1"], ids
        # ... and the second run passed through the first one's final structures, then
        # replaced them: they stay, the first run's data sources use them.
        assert watch[1, first.datums - 1] == finals[0]
        assert len(rows) == 4, len(rows)  # 2 per run: m0/m1's and m2's
        # m2's files came through put_data_source (the other updates: the bulk statements)
        assert _assets(database, first.uid, "m2_v_l1") == len(first.parts["m2"]) == 3

        # Each run reads back (i_l1 has v_l1's structure row, checked above; 0.1 s a read)
        client = catalog.client  # databroker, through the profile (an in-process app)
        for run in (first, second):
            for meter in ROWS:
                array = client[run.uid][meter][f"{meter}_v_l1"]
                assert array.shape == (run.rows(meter),)
                np.testing.assert_array_equal(
                    array.read(), _values(meter, "v_l1", range(run.rows(meter)))
                )
    finally:
        catalog.close()


dtypes = st.builds(BuiltinDtype, endianness=st.sampled_from(list(Endianness)),
                   kind=st.sampled_from([Kind.floating_point, Kind.integer, Kind.unsigned_integer]),
                   itemsize=st.sampled_from([1, 2, 4, 8]), dt_units=st.none() | st.just("s"))
chunk_lists = st.lists(st.lists(st.integers(0, 2**40), max_size=500).map(tuple),
                       min_size=1, max_size=3).map(tuple)


@given(dtype=dtypes, chunks=chunk_lists, resizable=st.booleans() | st.just((True, False)),
       dims=st.none() | st.just(("time",)))
def test_a_structure_is_stored_as_tiled_stores_it(dtype, chunks, resizable, dims) -> None:
    # Rows are content-addressed and shared with what Tiled's adapter writes itself
    # (put_data_source, create_node): the same structure must give the same dict and id.
    shape = tuple(sum(c) for c in chunks)
    array = ArrayStructure(data_type=dtype, chunks=chunks, shape=shape, dims=dims,
                           resizable=resizable)
    assert _structure_dict(array) == dataclasses.asdict(array)
    assert compute_structure_id(_structure_dict(array)) == compute_structure_id(
        dataclasses.asdict(array))
    table = TableStructure.from_arrow_table(pyarrow.table({"a": [1, 2], "b": ["x", "y"]}))
    assert _structure_dict(table) == dataclasses.asdict(table)
    assert _structure_dict({"given": "as a dict"}) == {"given": "as a dict"}
    assert _structure_dict(None) is None
