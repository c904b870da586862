"""Write bluesky runs into a Tiled catalog through the catalog's own adapter - no HTTP.

Why: ``bluesky_tiled_plugins.TiledWriter`` talks to Tiled over HTTP, one request per node
created, per shape update and per ``close_stream``.  Measured on this project's 2-core host
(Tiled 0.2.20, FastAPI 0.165): 10-20 ms of server CPU per request whatever it does, about 60 %
of it in FastAPI re-solving the route's dependencies on every request (Tiled's app uses
``dependency_overrides``, which makes ``solve_dependencies`` call ``get_dependant`` each
time).  A 10-meter run needs ~200 requests, 70 of them after the last sample (the final shape
of every key, then ``close_stream`` of every node): seconds of stop latency, and - with the
server in the acquisition process (the embedded catalog) - CPU taken from acquisition.

What: :class:`DirectCatalogWriter` writes the same catalog through the adapter that
``tiled serve`` calls after authentication (``tiled.catalog.from_uri``).  The catalog is the
one ``TiledWriter`` produces, read by the same clients (``BlueskyRun`` 3.0 spec, one
``BlueskyEventStream``/``composite`` container per stream, one external HDF5 array node per
StreamResource key built by the same consolidators, event data in an appendable ``internal``
table, ``start``/``stop`` metadata).  What it does differently, each measured:

* **batches**: nodes are created, and shapes updated, for all the documents read in one
  pass, in ONE transaction (the adapter's ``create_node``/``put_data_source`` statements,
  without a commit, refresh and reload per node, and as one multi-row INSERT per table and
  tree level): ~1 ms of CPU per node instead of ~10 ms; event tables are created and
  appended to in one transaction per storage (``init_storage``/``append_partition`` commit
  each: an fsync per table on SQLite);
* StreamDatums only update a consolidator in memory; shapes are written at most every
  ``live_period`` s (:meth:`DirectCatalogWriter.flush_live`; the writer process also
  flushes as soon as its journals go quiet) and at stop - so while the run goes on the
  catalog lags the files by at most that period, and it is exact at close;
* documents go through upstream's ``RunNormalizer`` (legacy Resource/Datum, reserved key
  names) **without its second jsonschema validation** (24 ms per descriptor here), and
  StreamDatums bypass it (it only copies them): the documents are the RunEngine's;
* event rows are appended at the same moments and at stop; event pages whose keys are all
  plain internal ones become rows directly (the normalizer deep-copies every event);
* an external key's node is created when its StreamResource arrives (if one stream declares
  the key), not at its first StreamDatum: a meter writes whole ~2 s chunks, so a short run's
  first datums come at its end, and creating 70 nodes for 10 meters there tripled the stop
  -> closed time.  The one visible difference from ``TiledWriter``: a declared key that
  never gets a datum (a gaps stream of a run without gaps) is there with zero rows instead
  of missing - both read as "no rows".

Limits: event data that are arrays of more than 16 elements (``TiledWriter`` writes those as
zarr arrays) or ragged are refused with an error naming the key - this project's devices emit
scalar events only; replay such a run's journal into a ``TiledWriter`` instead
(:func:`~._journal.replay_journal`).  Catalogs with a streaming cache or webhooks get the
adapter's per-node calls (their subscribers expect one message per change).
``close_stream`` is called for every node like ``TiledWriter`` does; without a streaming
cache or webhooks it does nothing.  Specs are not validated on the way in (``TiledWriter``
skips client-side validation too).  Uses Tiled's catalog internals (``orm``, the adapter's
statements): tied to ``tiled<0.3`` like the rest of this package.

Structures: each shape update points the array's data source at a row of the catalog's
``structures`` table (content-addressed: the id hashes the JSON, which lists every chunk of
the array - 4 h at 8 kHz: 450 chunks, ~4-8 KB).  Tiled's ``put_data_source`` never deletes the
row replaced, so ``catalog.db`` grew with the square of a run's length (3 meters of identical
shape, a flush per "second": 1.5 MB after 1 h of data, 18.5 MB after 4 h).  The writer deletes
the rows it replaced that no data source references any more, in the same transaction as the
update (on the per-node path, whose ``put_data_source`` commits by itself, in one more
transaction after it).  Rows are shared - by a meter's keys, meters of one shape, an earlier
run that ended where this one passes - and the foreign key cascades (deleting a referenced row
would delete its data sources), so the check is part of the DELETE.  It needs an index on
``data_sources.structure_id``, which Tiled 0.2 lacks: the writer adds :data:`STRUCTURE_INDEX`
to the catalog once (without it every deleted row scans the data sources: 113 ms for 3 rows
beside 100 000).  Measured (``benchmarks/writer_memory.py``, two 2 h runs of 3 meters):
``catalog.db`` stays at 0.3-0.4 MB instead of 4.8 MB (4 ``structures`` rows instead of 3618);
the DELETE costs ~0.8 ms of CPU per flush that changes shapes (0.4 ms per second of data here;
the CPU per second of data of whole runs, before and after, differs less than this 2-core
host's noise).  Every update still encodes and hashes the whole structure JSON, whose size
grows with the number of chunks (~0.6 ms of CPU per second of data per hour of a 3-meter
run); the structure is converted without Tiled's ``dataclasses.asdict``, which deep-copied the
chunk list element by element (:func:`_structure_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final

import anyio.to_thread
import pyarrow
from bluesky_tiled_plugins.utils import split_table, truncate_json_overflow
from bluesky_tiled_plugins.writing.consolidators import (
    ConsolidatorBase,
    Patch,
    consolidator_factory,
)
from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import selectinload
from tiled.access_control.protocols import normalize_access_tags
from tiled.catalog import orm
from tiled.catalog.adapter import (
    STORAGE_ADAPTERS_BY_MIMETYPE,
    STRUCTURES,
    _resolve_access_tags,
)
from tiled.catalog.utils import compute_structure_id
from tiled.server.core import NoEntry
from tiled.storage import FileStorage, SQLStorage
from tiled.structures.core import Spec, StructureFamily
from tiled.structures.data_source import DataSource, Management
from tiled.structures.table import TableStructure

from ._consolidator import install_compact_consolidator

logger = logging.getLogger(__name__)

MAX_ARRAY_SIZE: Final = 16
"""As ``TiledWriter``: event arrays above this many elements are not table cells."""
MAX_TABLE_COLUMNS: Final = 1024
"""As ``TiledWriter``: wider event tables are split into ``internal_0``, ``internal_1``..."""
SQL_TABLE_MIMETYPE: Final = "application/x-tiled-sql-table"
STRUCTURE_INDEX: Final = "smartmeter_ix_data_sources_structure_id"
"""The index on ``data_sources.structure_id`` that pruning replaced structures needs (Tiled
0.2 has none: each deleted ``structures`` row would cost a scan of every data source)."""


_PLAIN: Final = frozenset({int, float, str, bool, type(None)})


def _structure_dict(structure: Any) -> Any:
    """A structure as the catalog stores it: what Tiled's adapter makes of it
    (``dataclasses.asdict``), equal value for value, so its ``structures`` row id is the same.

    ``asdict`` deep-copies every element of ``chunks`` one by one, which grows with the run:
    4 h of 8 kHz data holds ~450 chunks per key, and it was most of the writer's CPU per
    shape update late in a long run.  Here a tuple or list of plain scalars is copied whole.
    """
    if structure is None or isinstance(structure, dict):
        return structure
    return _plain(structure)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple, as asdict
        return type(value)(*[_plain(v) for v in value])
    if isinstance(value, list | tuple):
        if set(map(type, value)) <= _PLAIN:
            return type(value)(value)
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return type(value)((_plain(k), _plain(v)) for k, v in value.items())
    return copy.deepcopy(value)


def _structure_row(source: DataSource) -> tuple[str, Any]:
    """A data source's ``structures`` row: (id, the hash of its canonical JSON; structure)."""
    structure = _structure_dict(source.structure)
    structure_id: str = compute_structure_id(structure)
    return structure_id, structure


class CatalogWriteError(RuntimeError):
    """A run's documents could not be written to the catalog."""


class _Normalizer(RunNormalizer):
    """Upstream's normalizer minus its second jsonschema validation of every document."""

    def emit(self, name: Any, doc: Any) -> None:
        self.dispatcher.process(name, doc)


class _Node:
    """A catalog node of a run: created in the next batch, then backed by its adapter."""

    def __init__(
        self,
        parent: _Node | None,
        key: str,
        family: StructureFamily,
        metadata: dict[str, Any],
        specs: list[Spec],
        access_tags: list[str] | None,
        data_source: DataSource | None = None,
    ) -> None:
        self.parent = parent
        self.key = key
        self.family = family
        self.metadata = metadata
        self.specs = specs
        self.access_tags = access_tags
        self.data_source = data_source
        self.adapter: Any = None
        self.storage_adapter: Any = None  # a writable table's SQL adapter, once looked up
        self.node_id: int | None = None
        self.data_source_id: int | None = None
        self.structure_id: str | None = None  # the structures row its data source points at
        self.assets: list[str] = [a.data_uri for a in data_source.assets] if data_source else []

    @property
    def path(self) -> list[str]:
        return [*(self.parent.path if self.parent is not None else []), self.key]


class _RunState:
    """Everything the writer keeps about one open run."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.normalizer = _Normalizer()
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self.normalizer.subscribe(lambda name, doc: self.docs.append((str(name), doc)))
        self.root: _Node | None = None
        self.access_tags: list[str] | None = None
        self.start_md: dict[str, Any] = {}
        self.streams: dict[str, _Node] = {}  # stream name -> container
        self.stream_names: dict[str, str] = {}  # descriptor uid -> stream name
        self.descriptor_keys: dict[str, frozenset[str]] = {}  # descriptor uid -> external keys
        self.data_keys: dict[str, Any] = {}
        self.internal_keys: set[str] = set()  # as the normalizer's: over all descriptors
        self.external_keys: set[str] = set()
        self.sres_docs: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, _Node] = {}  # sres uid and "<stream>_<key>" -> array node
        self.consolidators: dict[str, ConsolidatorBase] = {}
        self.dirty: dict[int, tuple[_Node, ConsolidatorBase, list[Patch]]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.tables: dict[str, _Node] = {}
        self.metadata_updates: dict[int, _Node] = {}  # created nodes whose metadata changed
        self.notes: list[str] = []
        self.documents = 0

    def all_nodes(self) -> Iterable[_Node]:
        seen: set[int] = set()
        for node in (
            *self.tables.values(), *self.nodes.values(), *self.streams.values(), self.root
        ):
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                yield node


class _Lent:
    """A connection lent to one Tiled storage call: its ``commit`` and ``close`` wait for
    the batch's."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return self._connection.cursor(*args, **kwargs)

    def commit(self) -> None:
        """Deferred to :meth:`_Transactions.__exit__`."""

    def close(self) -> None:
        """The batch closes it."""


class _Batched:
    """An SQL storage seen by Tiled's ``SQLAdapter`` calls of one batch: ``connect()``
    lends the same pooled connection each time (everything else is the storage's)."""

    def __init__(self, storage: SQLStorage) -> None:
        self._storage = storage
        self.connection: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def connect(self) -> _Lent:
        if self.connection is None:
            self.connection = self._storage.connect()
        return _Lent(self.connection)


class _Transactions:
    """Tiled storage calls (``init_storage``, ``append_partition``) batched into ONE
    transaction per SQL storage: each call otherwise commits on its own connection, which on
    SQLite is an fsync per table (4-30 ms on this host).  Committed on a clean exit, rolled
    back (by closing) on an error.  Not thread-safe: one worker thread runs a batch."""

    def __init__(self) -> None:
        self._batches: dict[int, _Batched] = {}

    def of(self, storage: Any) -> Any:
        if not isinstance(storage, SQLStorage):
            return storage  # files: nothing to batch
        batch = self._batches.get(id(storage))
        if batch is None:
            batch = self._batches[id(storage)] = _Batched(storage)
        return batch

    def __enter__(self) -> _Transactions:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                for batch in self._batches.values():
                    if batch.connection is not None:
                        batch.connection.commit()
        finally:
            for batch in self._batches.values():
                if batch.connection is not None:
                    batch.connection.close()  # back to the pool (rolled back if open)


class DirectCatalogWriter:
    """Apply bluesky documents of any number of runs to a Tiled catalog adapter.

    ``root`` is a started ``tiled.catalog`` container adapter (``from_uri(...)`` then
    ``await root.startup()``).  Call :meth:`process` for each document in order and
    :meth:`flush_live` after each batch of documents (it creates the nodes they need, and
    writes shapes and event rows every ``live_period`` s).  Not thread-safe: one asyncio task
    drives it.
    """

    def __init__(self, root: Any, *, live_period: float = 1.0) -> None:
        install_compact_consolidator()
        self.root = root
        self.live_period = float(live_period)
        self._runs: dict[str, _RunState] = {}
        self._run_of: dict[str, str] = {}  # descriptor / resource uid -> run uid
        self._pending: list[_Node] = []
        self._last_live = time.monotonic()
        context = root.context
        self._per_node = bool(context.streaming_cache or context.webhook_dispatcher)
        self._structure_index = False  # STRUCTURE_INDEX made sure of (or found impossible)

    @property
    def open_runs(self) -> tuple[str, ...]:
        return tuple(self._runs)

    def run_of(self, name: str, doc: dict[str, Any]) -> str:
        """The run uid a document belongs to (``""`` if unknown)."""
        if name == "start":
            return str(doc["uid"])
        if name in ("stop", "descriptor", "resource", "stream_resource"):
            return str(doc.get("run_start") or self._run_of.get(doc.get("uid", ""), ""))
        if name in ("event", "event_page", "stream_datum"):
            return self._run_of.get(doc.get("descriptor", ""), "")
        if name in ("datum", "datum_page"):
            return self._run_of.get(doc.get("resource", ""), "")
        return ""

    async def process(self, name: str, doc: dict[str, Any]) -> str | None:
        """Apply one document; returns the run uid when this was its stop document."""
        uid = self.run_of(name, doc)
        if name == "start":
            if uid in self._runs:
                raise CatalogWriteError(f"run {uid}: a second start document")
            self._runs[uid] = _RunState(uid)
        run = self._runs.get(uid)
        if run is None:
            raise CatalogWriteError(
                f"{name} document {doc.get('uid', '')!r} belongs to no open run (run {uid!r})"
            )
        if name in ("descriptor", "resource", "stream_resource"):
            self._run_of[doc["uid"]] = uid
        run.documents += 1
        if name == "stream_datum":
            self._stream_datum(run, doc)
            return None
        if name in ("event", "event_page") and self._plain_rows(run, name, doc):
            return None
        run.normalizer(name, doc)
        docs, run.docs = run.docs, []
        for out_name, out_doc in docs:
            if out_name == "stop":
                await self._stop(run, out_doc)
            else:
                self._apply(run, out_name, out_doc)
        if name == "stop":
            self._forget(run)
            return uid
        return None

    @property
    def pending(self) -> bool:
        """Whether anything applied is not in the catalog yet (nodes, rows, shapes)."""
        return bool(self._pending) or any(
            run.dirty or run.metadata_updates or any(run.rows.values())
            for run in self._runs.values()
        )

    async def flush_live(self, force: bool = False) -> None:
        """Create pending nodes; every ``live_period`` s (or ``force``) write shapes and rows."""
        now = time.monotonic()
        if not force and now - self._last_live < self.live_period:
            await self._materialize()
            return
        self._last_live = now
        for run in list(self._runs.values()):
            await self._write_rows(run)  # creates every pending node too, in one transaction
            await self._write_shapes(run)
            await self._write_metadata(run)
        await self._materialize()

    def abandon(self, uid: str) -> None:
        """Forget an open run (failed, or its journal ended without a stop document)."""
        run = self._runs.get(uid)
        if run is not None:
            self._forget(run)

    async def delete_run(self, uid: str) -> bool:
        """Remove a (partially written) run from the catalog; True if it was there."""
        try:
            node = await self.root.lookup_adapter([uid])
        except NoEntry:
            return False
        await node.delete(recursive=True, external_only=False)
        return True

    # ------------------------------------------------------------------ documents

    def _apply(self, run: _RunState, name: str, doc: dict[str, Any]) -> None:
        handler = getattr(self, f"_{name}", None)
        if handler is None:
            raise CatalogWriteError(f"run {run.uid}: no handler for {name} documents")
        handler(run, doc)

    def _new_node(self, node: _Node) -> _Node:
        self._pending.append(node)
        return node

    def _start(self, run: _RunState, doc: dict[str, Any]) -> None:
        doc = copy.copy(doc)
        run.access_tags = doc.pop("tiled_access_tags", None)
        extra_specs = doc.pop("tiled_specs", None) or []
        run.start_md = {"start": truncate_json_overflow(dict(doc))}
        specs = [Spec(s) if isinstance(s, str) else Spec(**s) for s in extra_specs]
        run.root = self._new_node(_Node(
            None, doc["uid"], StructureFamily.container, run.start_md,
            [*specs, Spec("BlueskyRun", version="3.0")], run.access_tags,
        ))

    def _descriptor(self, run: _RunState, doc: dict[str, Any]) -> None:
        name = doc["name"]
        run.data_keys.update(doc.get("data_keys", {}))
        for key, val in doc.get("data_keys", {}).items():
            (run.external_keys if "external" in val else run.internal_keys).add(key)
        run.stream_names[doc["uid"]] = name
        run.descriptor_keys[doc["uid"]] = frozenset(
            k for k, v in doc.get("data_keys", {}).items() if "external" in v
        )
        if name in run.streams:
            node = run.streams[name]
            updates = node.metadata.get("_config_updates", []) + [
                {"uid": doc["uid"], "time": doc["time"]}
            ]
            if conf := doc.get("configuration"):
                updates[-1]["configuration"] = conf
            node.metadata = {**node.metadata, "_config_updates": truncate_json_overflow(updates)}
            if node.adapter is not None:
                run.metadata_updates[id(node)] = node
            return
        for key, val in doc.get("data_keys", {}).items():
            if "external" in val or val.get("dtype") != "array":
                continue
            shape = val.get("shape", ())
            if None in shape or 0 <= MAX_ARRAY_SIZE < math.prod(shape):
                raise CatalogWriteError(
                    f"run {run.uid}: event data key {key!r} of stream {name!r} is an array "
                    f"of shape {shape}; the direct writer stores scalar event data only "
                    "(replay the run's journal into a TiledWriter)"
                )
        metadata = {k: v for k, v in doc.items() if k not in {"name", "object_keys", "run_start"}}
        run.streams[name] = self._new_node(_Node(
            run.root, name, StructureFamily.container, truncate_json_overflow(metadata),
            [Spec("BlueskyEventStream", version="3.0"), Spec("composite")], run.access_tags,
        ))

    def _plain_rows(self, run: _RunState, name: str, doc: dict[str, Any]) -> bool:
        """Table rows of an event (page) straight from the document, as the normalizer and
        :meth:`_event` would make them, when it has nothing to change: every key internal
        (so none reserved, none filled, no Datum to resolve).  False: take the normalizer.

        Why: the normalizer deep-copies each event and filters its keys with a list
        membership test per key; an end-of-run page of ~150 rows cost ~0.1 s there.
        """
        data, timestamps = doc["data"], doc["timestamps"]
        stream = run.stream_names.get(doc.get("descriptor", ""))
        internal, external = run.internal_keys, run.external_keys
        if (
            stream is None
            or doc.get("filled")  # even False: the normalizer drops an unfilled key
            or not data.keys() <= internal
            or not timestamps.keys() <= internal
            or not external.isdisjoint(data)
            or not external.isdisjoint(timestamps)
        ):
            return False
        rows = run.rows[stream]
        if name == "event":
            row = {"seq_num": doc["seq_num"], "time": doc["time"], **data}
            row.update({f"ts_{k}": v for k, v in timestamps.items()})
            rows.append(row)
            return True
        seq_nums, times = doc["seq_num"], doc["time"]
        count = len(seq_nums)
        columns = [*data.values(), *timestamps.values()]
        if len(times) != count or len(doc["uid"]) != count or any(
            len(c) != count for c in columns
        ):
            return False  # ragged: the normalizer's unpacking decides
        names = [*data, *(f"ts_{k}" for k in timestamps)]
        for i in range(count):
            row = {"seq_num": seq_nums[i], "time": times[i]}
            row.update(zip(names, (c[i] for c in columns), strict=True))
            rows.append(row)
        return True

    def _event(self, run: _RunState, doc: dict[str, Any]) -> None:
        name = run.stream_names[doc["descriptor"]]
        row = {"seq_num": doc["seq_num"], "time": doc["time"], **doc["data"]}
        row.update({f"ts_{k}": v for k, v in doc["timestamps"].items()})
        run.rows[name].append(row)

    def _stream_resource(self, run: _RunState, doc: dict[str, Any]) -> None:
        run.sres_docs[doc["uid"]] = doc
        # Create its node now when one stream declares the key: a flyer emits its resources
        # at the first collect, its first datum only once a chunk is on disk (after ~2 s,
        # or at the end of a short run - where creating every node would delay the close).
        streams = [
            name for uid, name in run.stream_names.items()
            if doc["data_key"] in run.descriptor_keys.get(uid, ())
        ]
        if len(set(streams)) == 1:
            self._sres_node(run, doc["uid"], streams[0])

    def _stream_datum(self, run: _RunState, doc: dict[str, Any]) -> None:
        stream = run.stream_names[doc["descriptor"]]
        node, consolidator = self._sres_node(run, doc["stream_resource"], stream)
        patch = consolidator.consume_stream_datum(doc)
        entry = run.dirty.get(id(consolidator))
        if entry is None:
            run.dirty[id(consolidator)] = (node, consolidator, [patch])
        else:
            entry[2].append(patch)

    async def _stop(self, run: _RunState, doc: dict[str, Any]) -> None:
        doc = dict(doc)
        await self._write_rows(run)  # creates the pending nodes with the new tables
        await self._write_shapes(run)
        seen: set[int] = set()
        for key, consolidator in run.consolidators.items():
            if id(consolidator) in seen or not consolidator.metadata:
                continue
            seen.add(id(consolidator))
            node = run.nodes[key]
            node.metadata = dict(consolidator.metadata)
            run.metadata_updates[id(node)] = node
        await self._write_metadata(run)
        notes = list(dict.fromkeys(doc.pop("_run_normalizer_notes", []) + run.notes))
        metadata = {**run.start_md, "stop": truncate_json_overflow(doc)}
        if notes:
            metadata["notes"] = notes
        assert run.root is not None and run.root.adapter is not None
        await run.root.adapter.replace_metadata(metadata=metadata, drop_revision=True)
        for node in run.all_nodes():
            await node.adapter.close_stream()

    # ------------------------------------------------------------------ external data

    def _sres_node(
        self, run: _RunState, sres_uid: str, stream: str
    ) -> tuple[_Node, ConsolidatorBase]:
        if sres_uid in run.nodes:
            return run.nodes[sres_uid], run.consolidators[sres_uid]
        sres_doc = run.sres_docs.get(sres_uid)
        if sres_doc is None:
            raise CatalogWriteError(
                f"run {run.uid}: stream resource {sres_uid} is referenced before it was received"
            )
        full_key = f"{stream}_{sres_doc['data_key']}"
        if full_key in run.nodes:
            node, consolidator = run.nodes[full_key], run.consolidators[full_key]
            consolidator.update_from_stream_resource(sres_doc)
        else:
            parent = run.streams[stream]
            consolidator = consolidator_factory(sres_doc, parent.metadata)
            data_source = consolidator.get_data_source()
            node = self._new_node(_Node(
                parent, consolidator.data_key, data_source.structure_family, {}, [],
                run.access_tags, data_source,
            ))
        run.nodes[sres_uid] = run.nodes[full_key] = node
        run.consolidators[sres_uid] = run.consolidators[full_key] = consolidator
        return node, consolidator

    async def _write_shapes(self, run: _RunState) -> None:
        dirty, run.dirty = run.dirty, {}
        bulk: list[tuple[_Node, DataSource]] = []
        single: list[tuple[_Node, DataSource, Patch]] = []
        for node, consolidator, patches in dirty.values():
            data_source = consolidator.get_data_source()
            data_source.id = node.data_source_id
            if self._per_node or [a.data_uri for a in data_source.assets] != node.assets:
                single.append((node, data_source, Patch.combine_patches(patches)))
            else:
                bulk.append((node, data_source))
        if single or bulk:
            await self._ensure_structure_index()
        if single:
            await self._put_data_sources(single)
        if bulk:
            await self._put_structures(run, bulk)

    async def _put_data_sources(self, single: list[tuple[_Node, DataSource, Patch]]) -> None:
        """The adapter's ``put_data_source`` per node (new assets, or a streaming cache or
        webhooks that expect one message per change); it commits each on its own, so the
        structures it replaced are pruned in one more transaction."""
        from tiled.stream_messages import ArrayPatch

        replaced: set[str] = set()
        for node, data_source, patch in single:
            await node.adapter.put_data_source(
                data_source, ArrayPatch(shape=patch.shape, offset=patch.offset)
            )
            node.assets = [a.data_uri for a in data_source.assets]
            if node.structure_id is not None:
                replaced.add(node.structure_id)
            node.structure_id, _ = _structure_row(data_source)
        async with self.root.context.session() as db:
            await self._prune_structures(db, replaced)
            await db.commit()

    async def _put_structures(self, run: _RunState, bulk: list[tuple[_Node, DataSource]]) -> None:
        """New structures of many nodes in ONE transaction and two executemany statements
        (``put_data_source``'s statements; the assets are those the node was created with),
        the structures they replaced pruned in the same transaction."""
        structures: dict[str, Any] = {}
        rows = []
        for _node, data_source in bulk:
            structure_id, structure = _structure_row(data_source)
            structures[structure_id] = structure
            rows.append({
                "id": data_source.id,
                "structure_family": data_source.structure_family,
                "mimetype": data_source.mimetype,
                "management": data_source.management,
                "parameters": data_source.parameters,
                "properties": data_source.properties,
                "structure_id": structure_id,
            })
        replaced = {node.structure_id for node, _ in bulk if node.structure_id is not None}
        async with self.root.context.session() as db:
            await db.execute(
                self.root.insert(orm.Structure).on_conflict_do_nothing(index_elements=["id"]),
                [{"id": k, "structure": v} for k, v in structures.items()],
            )
            await db.execute(update(orm.DataSource), rows)  # bulk UPDATE by primary key
            await self._prune_structures(db, replaced - structures.keys())
            await db.commit()
        for (node, _), row in zip(bulk, rows, strict=True):
            node.structure_id = row["structure_id"]

    @staticmethod
    async def _prune_structures(db: Any, structure_ids: set[str]) -> None:
        """Delete those of these ``structures`` rows that no data source references any more.

        Rows are content-addressed and shared by every data source of the same structure (the
        keys of a meter, meters of one shape, other runs): only unreferenced ones may go - the
        foreign key ``data_sources.structure_id`` cascades, a referenced row's deletion would
        delete its data sources.  Checked in the caller's transaction, after its UPDATE."""
        if not structure_ids:
            return
        ids = sorted(structure_ids)
        sources, structures = orm.DataSource.__table__, orm.Structure.__table__
        referenced = select(sources.c.structure_id).where(sources.c.structure_id.in_(ids))
        await db.execute(
            delete(structures).where(structures.c.id.in_(ids), structures.c.id.not_in(referenced))
        )

    async def _ensure_structure_index(self) -> None:
        """Create :data:`STRUCTURE_INDEX` if the catalog lacks it (once per writer): without
        it every pruned row costs a scan of ``data_sources`` (measured: 113 ms for 3 rows
        beside 100 000 data sources, 0.3 ms with it).  If the database refuses (PostgreSQL
        without the privilege), pruning goes on without it, slower."""
        if self._structure_index:
            return
        self._structure_index = True
        statement = text(
            f"CREATE INDEX IF NOT EXISTS {STRUCTURE_INDEX} ON data_sources (structure_id)"
        )
        try:
            async with self.root.context.session() as db:
                await db.execute(statement)
                await db.commit()
        except SQLAlchemyError as exc:
            logger.warning(
                "catalog %s: cannot create index %s (%s); pruning replaced structures "
                "scans data_sources", self.root.context.engine.url.render_as_string(),
                STRUCTURE_INDEX, exc,
            )

    async def _put_structure(self, db: Any, data_source: DataSource) -> str:
        structure_id, structure = _structure_row(data_source)
        await db.execute(
            self.root.insert(orm.Structure)
            .values(id=structure_id, structure=structure)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        return structure_id

    async def _write_metadata(self, run: _RunState) -> None:
        updates, run.metadata_updates = run.metadata_updates, {}
        for node in updates.values():
            await node.adapter.replace_metadata(metadata=node.metadata, drop_revision=True)

    # ------------------------------------------------------------------ creating nodes

    async def _materialize(self) -> None:
        """Create every pending node (parents first) in one transaction."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self._per_node:
            for node in pending:
                assert node.parent is None or node.parent.adapter is not None
                parent = self.root if node.parent is None else node.parent.adapter
                node.adapter = await parent.create_node(
                    structure_family=node.family, metadata=node.metadata, key=node.key,
                    specs=node.specs,
                    data_sources=[node.data_source] if node.data_source else None,
                    access_tags=node.access_tags,
                )
                node.node_id = node.adapter.node.id
                if node.data_source is not None:
                    (created,) = await node.adapter.data_sources()
                    node.data_source_id = created.id
                    node.structure_id, _ = _structure_row(created)
            return
        context = self.root.context
        tables = [
            node for node in pending
            if node.data_source is not None and node.data_source.management != Management.external
        ]
        if tables:
            await anyio.to_thread.run_sync(self._init_tables, tables)
        async with context.session() as db:
            if any(node.access_tags for node in pending):
                for node in pending:
                    await self._insert_node(db, node)
            else:
                await self._insert_nodes(db, pending)
            await db.commit()
            ids = [node.node_id for node in pending]
            rows = (
                await db.execute(
                    select(orm.Node)
                    .filter(orm.Node.id.in_(ids))
                    .options(
                        selectinload(orm.Node.data_sources).selectinload(orm.DataSource.structure)
                    )
                )
            ).scalars().all()
        by_id = {row.id: row for row in rows}
        for node in pending:
            node.adapter = STRUCTURES[node.family](context, by_id[node.node_id])
        for node in tables:
            # What ``get_adapter`` builds, without its query for the data source just written
            source = node.data_source
            assert source is not None
            node.storage_adapter = context.adapters_by_mimetype[source.mimetype].from_catalog(
                source, by_id[node.node_id], **source.parameters
            )

    async def _insert_nodes(self, db: Any, nodes: list[_Node]) -> None:
        """``create_node``'s statements for many nodes without access tags: per tree level ONE
        INSERT of the nodes (RETURNING their ids), then one of their data sources, one of the
        structures and one of the asset links - instead of two ORM flushes and a few
        statements per node (2-10 ms of CPU per node on this host, for ~500 nodes at the
        first collect of 50 meters)."""
        todo = list(nodes)
        while todo:
            level = [n for n in todo if n.parent is None or n.parent.node_id is not None]
            if not level:
                raise CatalogWriteError(f"nodes {[n.path for n in todo]} have no parent")
            chosen = {id(n) for n in level}
            todo = [n for n in todo if id(n) not in chosen]
            rows = [
                {"key": n.key, "metadata_": n.metadata, "structure_family": n.family,
                 "specs": n.specs,
                 "parent": self.root.node.id if n.parent is None else n.parent.node_id}
                for n in level
            ]
            try:
                result = await db.execute(
                    insert(orm.Node).returning(orm.Node.id, sort_by_parameter_order=True), rows
                )
            except IntegrityError as exc:
                raise CatalogWriteError(
                    f"cannot create {[n.key for n in level]}: a node of one of these names "
                    f"exists already ({exc.orig})"
                ) from exc
            for n, node_id in zip(level, result.scalars().all(), strict=True):
                n.node_id = node_id
        sourced = [n for n in nodes if n.data_source is not None]
        if not sourced:
            return
        structures: dict[str, Any] = {}
        sources = []
        for n in sourced:
            source = n.data_source
            assert source is not None
            structure_id, structure = _structure_row(source)
            n.structure_id = structure_id
            structures[structure_id] = structure
            sources.append({
                "node_id": n.node_id, "structure_family": source.structure_family,
                "mimetype": source.mimetype, "management": source.management,
                "parameters": source.parameters, "properties": source.properties,
                "structure_id": structure_id,
            })
        await db.execute(
            self.root.insert(orm.Structure).on_conflict_do_nothing(index_elements=["id"]),
            [{"id": k, "structure": v} for k, v in structures.items()],
        )
        result = await db.execute(
            insert(orm.DataSource).returning(orm.DataSource.id, sort_by_parameter_order=True),
            sources,
        )
        assets: dict[str, int] = {}  # data_uri -> id: a meter's file backs all its keys
        links = []
        for n, source_id in zip(sourced, result.scalars().all(), strict=True):
            n.data_source_id = source_id
            assert n.data_source is not None
            for asset in n.data_source.assets:
                if asset.data_uri not in assets:
                    assets[asset.data_uri] = await self.root._put_asset(db, asset)
                links.append({"asset_id": assets[asset.data_uri], "data_source_id": source_id,
                              "parameter": asset.parameter, "num": asset.num})
        if links:
            await db.execute(insert(orm.DataSourceAssetAssociation), links)

    async def _insert_node(self, db: Any, node: _Node) -> None:
        """``create_node``'s statements for one node with at most one external data source."""
        parent_id = self.root.node.id if node.parent is None else node.parent.node_id
        row = orm.Node(
            key=node.key, parent=parent_id, metadata_=node.metadata,
            structure_family=node.family, specs=node.specs,
        )
        if node.access_tags:
            row.access_tags = await _resolve_access_tags(
                db, normalize_access_tags(node.access_tags)
            )
        db.add(row)
        try:
            await db.flush()
        except IntegrityError as exc:
            raise CatalogWriteError(
                f"cannot create {node.key!r}: a node of that name exists already ({exc.orig})"
            ) from exc
        node.node_id = row.id
        source = node.data_source
        if source is None:
            return
        structure_id = node.structure_id = await self._put_structure(db, source)
        # node_id set directly (create_node appends to the relationship, which needs a
        # refresh of the node first: one SELECT per node more)
        source_row = orm.DataSource(
            node_id=row.id, structure_family=source.structure_family, mimetype=source.mimetype,
            management=source.management, parameters=source.parameters,
            properties=source.properties, structure_id=structure_id,
        )
        db.add(source_row)
        await db.flush()
        for asset in source.assets:
            asset_id = await self.root._put_asset(db, asset)
            db.add(orm.DataSourceAssetAssociation(
                asset_id=asset_id, data_source_id=source_row.id, parameter=asset.parameter,
                num=asset.num,
            ))
        node.data_source_id = source_row.id

    def _init_tables(self, nodes: list[_Node]) -> None:
        """``create_node``'s storage step for writable data sources (event tables), in one
        transaction per storage (``init_storage`` commits each table: an fsync each on
        SQLite).  Runs in a worker thread; replaces each node's data source by the
        initialised one (table name, dataset id, asset)."""
        with _Transactions() as transactions:
            for node in nodes:
                source = node.data_source
                assert source is not None
                adapter_cls = STORAGE_ADAPTERS_BY_MIMETYPE[source.mimetype]
                supported = getattr(adapter_cls, "supported_storage", lambda: {FileStorage})()
                for storage in self.root.context.writable_storage.values():
                    if isinstance(storage, tuple(supported)):
                        break
                else:
                    raise CatalogWriteError(
                        f"{node.key!r}: no writable storage of the catalog takes "
                        f"{source.mimetype} (it needs one of {[c.__name__ for c in supported]})"
                    )
                node.data_source = adapter_cls.init_storage(
                    transactions.of(storage), source, node.path
                )

    # ------------------------------------------------------------------ event data

    async def _write_rows(self, run: _RunState) -> None:
        """Append the rows of every stream; tables new to this batch are created together."""
        waiting: list[tuple[_Node, pyarrow.Table]] = []
        for stream, rows in run.rows.items():
            if not rows:
                continue
            table = pyarrow.Table.from_pylist(rows)
            rows.clear()
            for suffix, part in self._parts(table):
                key = f"{stream}{suffix}"
                if key not in run.tables:
                    run.tables[key] = self._new_table(run, stream, suffix, part)
                waiting.append((run.tables[key], part))
        await self._materialize()
        for node, _part in waiting:
            if node.storage_adapter is None:  # created one by one (a streaming cache)
                node.storage_adapter = await node.adapter.get_adapter()
        if waiting:
            await anyio.to_thread.run_sync(self._append, waiting)

    @staticmethod
    def _append(parts: list[tuple[_Node, pyarrow.Table]]) -> None:
        """``append_partition`` of every table, in one transaction per storage (worker thread)."""
        with _Transactions() as transactions:
            for node, part in parts:
                adapter = node.storage_adapter
                storage = adapter.storage
                adapter.storage = transactions.of(storage)
                try:
                    adapter.append_partition(0, part)
                finally:
                    adapter.storage = storage

    @staticmethod
    def _parts(table: pyarrow.Table) -> list[tuple[str, pyarrow.Table]]:
        if table.num_columns <= MAX_TABLE_COLUMNS:
            return [("", table)]
        return [(f"_{i}", t) for i, t in enumerate(split_table(table, MAX_TABLE_COLUMNS))]

    def _new_table(self, run: _RunState, stream: str, suffix: str, table: pyarrow.Table) -> _Node:
        columns = set(table.column_names)  # a property that builds a new list each call
        metadata = truncate_json_overflow({k: v for k, v in run.data_keys.items() if k in columns})
        schema = table.schema
        for i, field in enumerate(table.schema):
            if pyarrow.types.is_null(field.type):
                schema = schema.set(i, field.with_type(pyarrow.string()))
            elif pyarrow.types.is_list(field.type) and pyarrow.types.is_null(
                field.type.value_type
            ):
                schema = schema.set(i, field.with_type(pyarrow.list_(pyarrow.string())))
        data_source = DataSource(
            structure=TableStructure.from_schema(schema, 1),
            structure_family=StructureFamily.table,
            mimetype=SQL_TABLE_MIMETYPE,
            parameters={},
            management=Management.writable,
        )
        return self._new_node(_Node(
            run.streams[stream], f"internal{suffix}", StructureFamily.table, metadata, [],
            run.access_tags, data_source,
        ))

    # ------------------------------------------------------------------ bookkeeping

    def _forget(self, run: _RunState) -> None:
        self._runs.pop(run.uid, None)
        for key in [k for k, v in self._run_of.items() if v == run.uid]:
            del self._run_of[key]
        mine = {id(node) for node in run.all_nodes()}
        self._pending = [node for node in self._pending if id(node) not in mine]
