"""Storage of meter runs: waveforms in HDF5, documents in a Tiled catalog (via databroker).

* :class:`WaveformWriter` - one SWMR HDF5 file per meter per run: float32 channels, float64
  absolute time, packet and gap tables (gaps are recorded, never filled).
* :class:`StreamAssets` / :class:`GapAssets` - the StreamResource/StreamDatum side of
  ``bluesky.protocols.WritesStreamAssets`` for the samples stream and the gaps stream;
  :func:`stream_data_keys` / :func:`gap_data_keys` for ``describe_collect`` before a file exists.
* :func:`setup_embedded_catalog` - in-process Tiled catalog registered as a profile, so
  ``databroker.from_profile(name)`` opens it; :func:`connect_server` for ``tiled serve``
  (``scripts/postgres.sh`` starts one backed by PostgreSQL).
* :func:`read_stream`, :func:`time_window`, :func:`gap_grid` (+ HDF5 variants) - read-back;
  :func:`stream_nodes` lists a stream's arrays with shapes and data sources in one request.

Write documents with :func:`make_tiled_writer` (a ``bluesky_tiled_plugins.TiledWriter`` with
:class:`CompactHDF5Consolidator` installed for HDF5: upstream's consolidator keeps one dict entry
per sample, see ``_consolidator.py``); never ``bluesky.callbacks.tiled_writer``.
"""

from ._catalog import (
    DEFAULT_PROFILE,
    EmbeddedCatalog,
    close_client,
    connect_server,
    open_catalog,
    setup_embedded_catalog,
    write_server_profile,
)
from ._consolidator import (
    CompactHDF5Consolidator,
    install_compact_consolidator,
    make_tiled_writer,
    uninstall_compact_consolidator,
)
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
    GAP_FIELDS,
    PACKET_FIELDS,
    UNKNOWN_MISSING,
    WaveformWriter,
    default_chunk_samples,
    read_packets,
    sample_times,
    time_spacing,
)
from ._readback import (
    GRID_VIEW_LABEL,
    ReadAccess,
    StreamNode,
    find_time_key,
    gap_grid,
    nan_grid,
    read_gaps,
    read_gaps_hdf5,
    read_stream,
    search_sorted,
    stream_nodes,
    time_window,
    time_window_hdf5,
)

__all__ = [
    "DEFAULT_PROFILE",
    "GAP_FIELDS",
    "GRID_VIEW_LABEL",
    "HDF5_MIMETYPE",
    "PACKET_FIELDS",
    "ReadAccess",
    "UNKNOWN_MISSING",
    "CompactHDF5Consolidator",
    "EmbeddedCatalog",
    "GapAssets",
    "StreamAssets",
    "StreamNode",
    "WaveformWriter",
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
    "read_gaps",
    "read_gaps_hdf5",
    "read_packets",
    "read_stream",
    "sample_times",
    "search_sorted",
    "setup_embedded_catalog",
    "stream_data_keys",
    "stream_nodes",
    "time_spacing",
    "time_window",
    "time_window_hdf5",
    "uninstall_compact_consolidator",
    "write_server_profile",
]
