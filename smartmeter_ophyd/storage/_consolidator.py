"""A TiledWriter whose HDF5 consolidator stays O(1) in memory for per-sample stream indices.

Why: ``bluesky_tiled_plugins.writing.consolidators.ConsolidatorBase.consume_stream_datum``
(bluesky-tiled-plugins 2.0.12) does, for every StreamDatum::

    new_seqnums = range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])
    new_indices = range(doc["indices"]["start"], doc["indices"]["stop"])
    self._seqnums_to_indices_map.update(dict(zip(new_seqnums, new_indices)))

i.e. one ``dict[int, int]`` entry per *index* per data key.  A meter stream has one index per
sample, so a meter-hour at 8 kHz with 7 data keys builds ~200 M entries (~26 GB) and spends
minutes in it.  In that version the map's only reader is ``ConsolidatorBase.has_skips``
(``self._num_rows > len(self._seqnums_to_indices_map)``); nothing else in
``bluesky_tiled_plugins`` (``tiled_writer.py``, ``validator.py``, ``_dispatcher.py``) touches it.
No upstream issue about it was found (searched the bluesky issue tracker, 2 queries).

What: :class:`CompactHDF5Consolidator` keeps the same mapping as contiguous runs
``(seq_start, index_start, length)`` (merged when a StreamDatum continues the previous one), so
a whole run costs a handful of tuples.  ``has_skips`` is computed from the runs with the
stock semantics (the number of *distinct* seq_nums mapped, later runs overriding earlier ones
exactly as ``dict.update`` does).  ``_seqnums_to_indices_map`` is still available as a property
that materialises the dict on demand (for code that inspects it; it is as large as upstream's).
Everything else - shape, chunks, assets, data source, patches - is inherited unchanged.

How to use: :func:`make_tiled_writer` (or :func:`install_compact_consolidator` once, then
``TiledWriter`` as usual).  Installing replaces the ``"application/x-hdf5"`` entry of
``CONSOLIDATOR_REGISTRY`` **process-wide**; it is explicit, idempotent and reversible
(:func:`uninstall_compact_consolidator`).  Multi-file HDF5 resources (StreamResource with a
``template`` parameter) are still handled by upstream's ``MultipartHDF5Consolidator`` (the
inherited ``HDF5Consolidator.__new__`` dispatches to it); meter files never use templates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from bluesky_tiled_plugins import TiledWriter
from bluesky_tiled_plugins.writing import consolidators as _upstream
from bluesky_tiled_plugins.writing.consolidators import HDF5Consolidator, Patch

from ._documents import HDF5_MIMETYPE

logger = logging.getLogger(__name__)

_STOCK_HDF5_CONSOLIDATOR: Final = HDF5Consolidator


class CompactHDF5Consolidator(HDF5Consolidator):
    """``HDF5Consolidator`` that records seq_num -> index as runs instead of a dict per index."""

    def __init__(self, stream_resource: Any, descriptor: Any) -> None:
        self._runs: list[tuple[int, int, int]] = []  # (seq_start, index_start, length)
        self._mapped: int = 0  # distinct seq_nums mapped, valid while not self._mapped_dirty
        self._mapped_dirty = False
        self._seq_high: int | None = None  # max seq_stop seen (fast path: seq_nums in order)
        super().__init__(stream_resource, descriptor)

    # -- the compact map -------------------------------------------------------------------

    def _add_run(self, seq_start: int, index_start: int, length: int) -> None:
        if length <= 0:
            return
        if self._runs:
            s, i, n = self._runs[-1]
            if seq_start == s + n and index_start == i + n:
                self._runs[-1] = (s, i, n + length)
                self._account(seq_start, length)
                return
        self._runs.append((seq_start, index_start, length))
        self._account(seq_start, length)

    def _account(self, seq_start: int, length: int) -> None:
        if self._seq_high is None or seq_start >= self._seq_high:
            self._mapped += length
            self._seq_high = seq_start + length
        else:
            self._mapped_dirty = True  # overlapping seq_nums: recount the union on demand
            self._seq_high = max(self._seq_high, seq_start + length)

    @property
    def mapped_seqnums(self) -> int:
        """Number of distinct seq_nums mapped to an index (``len`` of upstream's dict)."""
        if self._mapped_dirty:
            total, end = 0, None
            for s, _, n in sorted(self._runs):
                lo = s if end is None else max(s, end)
                if s + n > lo:
                    total += s + n - lo
                end = s + n if end is None else max(end, s + n)
            self._mapped, self._mapped_dirty = total, False
        return self._mapped

    @property
    def seqnum_runs(self) -> tuple[tuple[int, int, int], ...]:
        """The mapping as ``(seq_start, index_start, length)`` runs, in arrival order."""
        return tuple(self._runs)

    @property
    def _seqnums_to_indices_map(self) -> dict[int, int]:
        """Upstream's dict, materialised on demand (O(rows): for inspection only)."""
        mapping: dict[int, int] = {}
        for s, i, n in self._runs:
            mapping.update(zip(range(s, s + n), range(i, i + n), strict=True))
        return mapping

    @_seqnums_to_indices_map.setter
    def _seqnums_to_indices_map(self, mapping: Mapping[int, int]) -> None:
        # ConsolidatorBase.__init__ assigns {}; accept any mapping for compatibility.
        self._runs, self._mapped, self._mapped_dirty, self._seq_high = [], 0, False, None
        for seq, index in sorted(mapping.items()):
            self._add_run(int(seq), int(index), 1)

    @property
    def has_skips(self) -> bool:
        """As upstream: more rows than seq_nums mapped to them."""
        return bool(self._num_rows > self.mapped_seqnums)

    # -- StreamDatum -----------------------------------------------------------------------

    def consume_stream_datum(self, doc: Any) -> Patch:
        """Upstream's ``ConsolidatorBase.consume_stream_datum`` with the compact map."""
        old_shape = self.shape
        indices, seq_nums = doc["indices"], doc["seq_nums"]
        self._num_rows += indices["stop"] - indices["start"]
        length = min(seq_nums["stop"] - seq_nums["start"], indices["stop"] - indices["start"])
        self._add_run(seq_nums["start"], indices["start"], length)
        return Patch(
            offset=(old_shape[0], *[0 for _ in self.shape[1:]]),
            shape=(self.shape[0] - old_shape[0], *self.shape[1:]),
        )


def install_compact_consolidator() -> None:
    """Register :class:`CompactHDF5Consolidator` for ``application/x-hdf5`` (process-wide).

    Idempotent.  Affects every ``TiledWriter`` of this process from now on, including ones
    already running (the registry is looked up per StreamResource).
    """
    registry = _upstream.CONSOLIDATOR_REGISTRY
    if registry[HDF5_MIMETYPE] is not CompactHDF5Consolidator:
        logger.info(
            "installing CompactHDF5Consolidator for %s (was %s)",
            HDF5_MIMETYPE,
            registry[HDF5_MIMETYPE].__name__,
        )
        registry[HDF5_MIMETYPE] = CompactHDF5Consolidator


def uninstall_compact_consolidator() -> None:
    """Put upstream's ``HDF5Consolidator`` back for ``application/x-hdf5``."""
    _upstream.CONSOLIDATOR_REGISTRY[HDF5_MIMETYPE] = _STOCK_HDF5_CONSOLIDATOR


def make_tiled_writer(client: Any, **kwargs: Any) -> TiledWriter:
    """``TiledWriter(client, **kwargs)`` after :func:`install_compact_consolidator`.

    Use this instead of constructing ``TiledWriter`` directly for meter streams (one
    StreamDatum index per sample); see the module docstring for why.
    """
    install_compact_consolidator()
    return TiledWriter(client, **kwargs)
