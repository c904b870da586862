"""Storage of meter runs: waveforms in HDF5, documents in a Tiled catalog (via databroker).

* :class:`WaveformWriter` - one SWMR HDF5 file per meter per run: float32 channels, float64
  absolute time, packet and gap tables (gaps are recorded, never filled).
* :class:`StreamAssets` / :class:`GapAssets` - the StreamResource/StreamDatum side of
  ``bluesky.protocols.WritesStreamAssets`` for the samples stream and the gaps stream;
  :func:`stream_data_keys` / :func:`gap_data_keys` for ``describe_collect`` before a file exists.
* :func:`setup_embedded_catalog` - in-process Tiled catalog registered as a profile, so
  ``databroker.from_profile(name)`` opens it; :func:`connect_server` for ``tiled serve``
  (``scripts/postgres.sh`` starts one backed by PostgreSQL).
* :class:`JournalSink` (``RE.subscribe(catalog.document_sink())``) - documents journaled in
  the acquisition process (:class:`JournalWriter`), written to the catalog by a writer process
  with :class:`DirectCatalogWriter` (Tiled's catalog adapter, no HTTP); the RunEngine waits
  only at each stop document until the run is closed.  :func:`replay_journal` feeds a kept
  journal to any callback; :func:`replay_into_tiled` writes one into a Tiled catalog (stop-less
  journals unbatched) and returns a :class:`ReplayReport`.
* :func:`read_stream`, :func:`time_window`, :func:`gap_grid` (+ HDF5 variants) - read-back;
  :func:`stream_nodes` lists a stream's arrays with shapes and data sources in one request.
* :func:`align_recordings` - meters' residual offsets measured on their recorded L1
  voltages; :class:`AlignmentWorker` runs it in a process of its own.

For a Tiled server, write documents with :func:`make_tiled_writer` (a ``bluesky_tiled_plugins.TiledWriter`` with
:class:`CompactHDF5Consolidator` installed for HDF5: upstream's consolidator keeps one dict entry
per sample, see ``_consolidator.py``); never ``bluesky.callbacks.tiled_writer``.

Imports are lazy (module ``__getattr__``): ``import smartmeter_ophyd.storage`` loads nothing
heavy, and each name loads only its own submodule, so the devices (HDF5 writing) start without
Tiled, bluesky-tiled-plugins, xarray or pandas.  A new public name goes in ``_EXPORTS`` and
``__all__`` (and the ``TYPE_CHECKING`` block, for type checkers).
"""

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._alignment import (
        AlignmentSession,
        AlignmentWorker,
        AlignmentWorkerError,
        RecordedAlignment,
        align_recordings,
        read_waveform,
    )
    from ._catalog import (
        DEFAULT_PROFILE,
        EmbeddedCatalog,
        close_client,
        connect_server,
        open_catalog,
        profile_server_uri,
        setup_embedded_catalog,
        write_server_profile,
    )
    from ._consolidator import (
        CompactHDF5Consolidator,
        install_compact_consolidator,
        make_tiled_writer,
        uninstall_compact_consolidator,
    )
    from ._direct import CatalogWriteError, DirectCatalogWriter
    from ._documents import (
        HDF5_MIMETYPE,
        GapAssets,
        StreamAssets,
        file_uri,
        gap_data_keys,
        gap_key,
        stream_data_keys,
    )
    from ._hdf5 import (
        COMPRESSION,
        GAP_FIELDS,
        PACKET_FIELDS,
        UNKNOWN_MISSING,
        WaveformWriter,
        default_chunk_samples,
        read_packets,
        sample_times,
        tiled_chunk_samples,
        time_spacing,
    )
    from ._journal import (
        JournalReader,
        JournalWriter,
        ReplayReport,
        read_journal,
        read_run_journal,
        replay_into_tiled,
        replay_journal,
    )
    from ._readback import (
        GRID_VIEW_LABEL,
        ReadAccess,
        StreamNode,
        child_keys,
        find_time_key,
        gap_grid,
        nan_grid,
        read_event_table,
        read_gaps,
        read_gaps_hdf5,
        read_stream,
        search_sorted,
        stream_nodes,
        time_span,
        time_window,
        time_window_hdf5,
    )
    from ._service import JournalSink, WriterConfig

_EXPORTS: Final[dict[str, tuple[str, ...]]] = {
    "_alignment": (
        "AlignmentSession",
        "AlignmentWorker",
        "AlignmentWorkerError",
        "RecordedAlignment",
        "align_recordings",
        "read_waveform",
    ),
    "_catalog": (
        "DEFAULT_PROFILE",
        "EmbeddedCatalog",
        "close_client",
        "connect_server",
        "open_catalog",
        "profile_server_uri",
        "setup_embedded_catalog",
        "write_server_profile",
    ),
    "_consolidator": (
        "CompactHDF5Consolidator",
        "install_compact_consolidator",
        "make_tiled_writer",
        "uninstall_compact_consolidator",
    ),
    "_direct": ("CatalogWriteError", "DirectCatalogWriter"),
    "_documents": (
        "HDF5_MIMETYPE",
        "GapAssets",
        "StreamAssets",
        "file_uri",
        "gap_data_keys",
        "gap_key",
        "stream_data_keys",
    ),
    "_hdf5": (
        "COMPRESSION",
        "GAP_FIELDS",
        "PACKET_FIELDS",
        "UNKNOWN_MISSING",
        "WaveformWriter",
        "default_chunk_samples",
        "read_packets",
        "sample_times",
        "tiled_chunk_samples",
        "time_spacing",
    ),
    "_journal": ("JournalReader", "JournalWriter", "ReplayReport", "read_journal",
                 "read_run_journal", "replay_into_tiled", "replay_journal"),
    "_readback": (
        "GRID_VIEW_LABEL",
        "ReadAccess",
        "StreamNode",
        "child_keys",
        "find_time_key",
        "gap_grid",
        "nan_grid",
        "read_event_table",
        "read_gaps",
        "read_gaps_hdf5",
        "read_stream",
        "search_sorted",
        "stream_nodes",
        "time_span",
        "time_window",
        "time_window_hdf5",
    ),
    "_service": ("JournalSink", "WriterConfig"),
}
_SUBMODULE: Final[dict[str, str]] = {
    name: module for module, names in _EXPORTS.items() for name in names
}


def __getattr__(name: str) -> Any:
    module = _SUBMODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULE))


__all__ = [
    "AlignmentSession",
    "AlignmentWorker",
    "AlignmentWorkerError",
    "COMPRESSION",
    "DEFAULT_PROFILE",
    "GAP_FIELDS",
    "GRID_VIEW_LABEL",
    "HDF5_MIMETYPE",
    "PACKET_FIELDS",
    "ReadAccess",
    "RecordedAlignment",
    "ReplayReport",
    "UNKNOWN_MISSING",
    "CatalogWriteError",
    "CompactHDF5Consolidator",
    "DirectCatalogWriter",
    "EmbeddedCatalog",
    "GapAssets",
    "JournalReader",
    "JournalSink",
    "JournalWriter",
    "StreamAssets",
    "StreamNode",
    "WaveformWriter",
    "align_recordings",
    "child_keys",
    "close_client",
    "connect_server",
    "default_chunk_samples",
    "file_uri",
    "find_time_key",
    "gap_data_keys",
    "gap_grid",
    "gap_key",
    "install_compact_consolidator",
    "make_tiled_writer",
    "nan_grid",
    "open_catalog",
    "profile_server_uri",
    "read_event_table",
    "read_gaps",
    "read_journal",
    "read_run_journal",
    "read_gaps_hdf5",
    "read_packets",
    "read_stream",
    "read_waveform",
    "replay_into_tiled",
    "replay_journal",
    "sample_times",
    "search_sorted",
    "setup_embedded_catalog",
    "stream_data_keys",
    "stream_nodes",
    "tiled_chunk_samples",
    "time_spacing",
    "time_span",
    "time_window",
    "time_window_hdf5",
    "uninstall_compact_consolidator",
    "write_server_profile",
    "WriterConfig",
]
