"""The catalog writer's Python memory does not grow with a run's length or the number of runs.

Why: the soak saw the writer process's RSS grow ~5.6 MB/h.  ``benchmarks/writer_memory.py``
found it is SQLite's page caches filling (native memory, ~2 MB per connection, bounded, see
that script); the writer's own Python state must stay as it is now:

* per StreamDatum and per event nothing is kept (``CompactHDF5Consolidator`` keeps the
  seq_num -> index map as merged runs: upstream's dict costs ~1.5 MB per 16384-sample datum);
* a closed run leaves nothing behind (``DirectCatalogWriter._forget``).

Measured with tracemalloc in this process, on a synthetic fly (one meter, a StreamDatum per
key every "2 s", an event every "1 s", a flush after each "second"; 60 s of it measured after
a 20 s warm-up, then a second run of the same length) written by
:class:`DirectCatalogWriter` into the session's embedded catalog.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid
from typing import Any

from smartmeter_ophyd.storage import DirectCatalogWriter

KEYS = ("v_l1", "i_l1", "v_l2", "i_l2", "v_l3", "i_l3", "time")
LIVE = ("time", "samples", "v_l1_rms", "p_total", "frequency")
CHUNK = 16384  # samples per StreamDatum at 8 kHz


class Fly:
    """The documents of one synthetic fly of one meter, one "second" at a time."""

    def __init__(self, directory: str) -> None:
        self.uid, self.second, self.datums = str(uuid.uuid4()), 0, 0
        self.samples, self.primary = str(uuid.uuid4()), str(uuid.uuid4())
        self.resources = [str(uuid.uuid4()) for _ in KEYS]
        self.directory = directory

    def opening(self) -> list[tuple[str, dict[str, Any]]]:
        docs: list[tuple[str, dict[str, Any]]] = [
            ("start", {"uid": self.uid, "time": 1.0e9, "plan_name": "synchronized_fly"}),
            ("descriptor", {
                "uid": self.samples, "run_start": self.uid, "time": 1.0e9, "name": "m0",
                "data_keys": {f"m0_{k}": {"source": "test", "dtype": "number", "shape": [],
                                          "external": "STREAM:"} for k in KEYS},
                "object_keys": {"m0": [f"m0_{k}" for k in KEYS]}, "configuration": {},
            }),
            ("descriptor", {
                "uid": self.primary, "run_start": self.uid, "time": 1.0e9, "name": "primary",
                "data_keys": {f"m0_live_{k}": {"source": "test", "dtype": "number",
                                               "shape": []} for k in LIVE},
                "object_keys": {"m0": [f"m0_live_{k}" for k in LIVE]}, "configuration": {},
            }),
        ]
        for key, sres in zip(KEYS, self.resources, strict=True):
            docs.append(("stream_resource", {
                "uid": sres, "data_key": f"m0_{key}", "mimetype": "application/x-hdf5",
                "uri": f"file://localhost{self.directory}/m0-{self.uid}.h5",
                "parameters": {"dataset": f"/{key}", "swmr": True, "chunk_shape": [262144]},
                "run_start": self.uid,
            }))
        return docs

    def next_second(self) -> list[tuple[str, dict[str, Any]]]:
        self.second += 1
        now = 1.0e9 + self.second
        docs: list[tuple[str, dict[str, Any]]] = [("event", {
            "uid": str(uuid.uuid4()), "time": now, "descriptor": self.primary,
            "seq_num": self.second, "filled": {},
            "data": {f"m0_live_{k}": 230.0 + self.second % 5 for k in LIVE},
            "timestamps": {f"m0_live_{k}": now for k in LIVE},
        })]
        if self.second % 2 == 0:
            n = self.second // 2 - 1
            for sres in self.resources:
                docs.append(("stream_datum", {
                    "uid": f"{sres}/{n}", "stream_resource": sres, "descriptor": self.samples,
                    "seq_nums": {"start": 1 + n * CHUNK, "stop": 1 + (n + 1) * CHUNK},
                    "indices": {"start": n * CHUNK, "stop": (n + 1) * CHUNK},
                }))
                self.datums += 1
        return docs

    def stop(self) -> tuple[str, dict[str, Any]]:
        return ("stop", {"uid": str(uuid.uuid4()), "run_start": self.uid,
                         "time": 1.0e9 + self.second, "exit_status": "success", "reason": "",
                         "num_events": {"primary": self.second}})


async def _drive(writer: DirectCatalogWriter, fly: Fly, seconds: int) -> None:
    for _ in range(seconds):
        for name, doc in fly.next_second():
            await writer.process(name, doc)
        await writer.flush_live(force=True)  # as the writer process when its journals go quiet


async def _open(writer: DirectCatalogWriter, fly: Fly) -> None:
    for name, doc in fly.opening():
        await writer.process(name, doc)


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def _measure(catalog: Any) -> dict[str, Any]:
    """Traced bytes: over 60 s of a fly after a warm-up; with a run open; after two runs."""
    from tiled.catalog import from_uri

    config = catalog.writer_config
    container = f"memory-{uuid.uuid4().hex[:8]}"
    catalog.client.create_container(container)
    tree = from_uri(config["uri"], writable_storage=config["writable_storage"],
                    readable_storage=config["readable_storage"])
    await tree.startup()
    out: dict[str, Any] = {}
    gc.collect()
    gc.freeze()  # the collections below then scan this test's objects only (0.2 s -> ms)
    tracemalloc.start(1)
    try:
        writer = DirectCatalogWriter(await tree.lookup_adapter([container]), live_period=0.0)
        directory = str(catalog.data_directory)
        first = Fly(directory)
        await _open(writer, first)
        await _drive(writer, first, 20)  # warm-up: the first flushes' caches, pools, imports
        before, datums = _traced(), first.datums
        await _drive(writer, first, 60)
        out["per_datum"] = (_traced() - before) / (first.datums - datums)
        out["datums"] = first.datums - datums
        with_run = _traced()
        await writer.process(*first.stop())
        await writer.flush_live(force=True)
        out["run_state"] = with_run - _traced()  # what the stop freed: the run's state
        stopped = _traced()
        second = Fly(directory)
        await _open(writer, second)
        await _drive(writer, second, 80)
        await writer.process(*second.stop())
        await writer.flush_live(force=True)
        out["per_run"] = _traced() - stopped
        out["left"] = (writer.open_runs, dict(writer._run_of), list(writer._pending))
    finally:
        tracemalloc.stop()
        gc.unfreeze()
        await tree.shutdown()
    return out


def test_writer_python_memory_is_bounded(embedded_catalog) -> None:
    figures = asyncio.run(_measure(embedded_catalog))
    assert figures["datums"] == 210
    # Upstream's per-index dict costs ~1.5 MB per datum; now ~70 B: bounded caches of
    # SQLAlchemy and anyio still settling, spread over the section's 210 datums.
    assert figures["per_datum"] < 1000, figures
    # The run's state was held while it was open and freed by its stop ...
    assert figures["run_state"] > 20_000, figures
    # ... and a second run of the same length leaves (almost) nothing more behind.
    assert figures["per_run"] < figures["run_state"] / 4, figures
    assert figures["left"] == ((), {}, []), figures
