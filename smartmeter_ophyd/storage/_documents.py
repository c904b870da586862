"""Bluesky stream documents (StreamResource / StreamDatum) for a meter's HDF5 file.

Intent: a flyer that writes with :class:`~._hdf5.WaveformWriter` delegates the document side of
``bluesky.protocols.WritesStreamAssets`` to these helpers:

* :class:`StreamAssets` - the **samples stream**.  One scalar data key per channel plus
  ``<prefix>_time`` (float64 absolute time), all ``external: "STREAM:"``; one sample is one
  index (one "event" of the stream).  ``describe()`` returns **singly nested** DataKeys, so the
  plan must ``declare_stream(..., collect=True)`` (ecosystem notes §1.2).
* :class:`GapAssets` - the **gaps stream** (design choice of this package).  Gaps must be
  visible in the catalog, but a gap is not a sample: it gets its own stream (conventionally
  ``"<stream>_gaps"``) whose index counts gap rows, with four integer keys
  ``<prefix>_gap_sample_index``, ``..._gap_expected_packet``, ``..._gap_received_packet`` and
  ``..._gap_missing_samples`` (-1 = unknown), backed by the ``/gaps`` datasets of the same file.
  bluesky collects one stream per ``collect`` message and a ``WritesStreamAssets`` device emits
  only stream assets, so a device exposes a :class:`GapAssets` as a separate collectable
  object (e.g. a child) and the plan collects it into the gaps stream (typically once, after
  ``collect_while_completing``).  A run without gaps still has an (empty) declared gaps
  stream, which reads as "no gaps" instead of "unknown".

The RunEngine fills in ``run_start``, ``descriptor`` and ``seq_nums``; these helpers leave them
empty exactly as ``event_model.ComposeStreamDatum`` does without ``seq_nums``.  When several
meters share one stream the RE passes ``index=min(get_index())``; a helper never emits beyond
its own flushed count.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Literal

import h5py
from event_model import ComposeStreamDatum, ComposeStreamResource, StreamRange

from ._hdf5 import GAP_FIELDS, GAPS_GROUP, TIME_DATASET, WaveformWriter, tiled_chunk_samples

logger = logging.getLogger(__name__)

HDF5_MIMETYPE: Final = "application/x-hdf5"
TIME_KEY_SUFFIX: Final = "time"
GAP_KEY_INFIX: Final = "gap_"

AssetDoc = tuple[Literal["stream_resource", "stream_datum"], dict[str, Any]]


def file_uri(path: str | os.PathLike[str]) -> str:
    """``file://localhost/abs/path`` as TiledWriter's HDF5 consolidator expects."""
    return "file://localhost" + os.path.abspath(os.fspath(path))


class _DatasetStream:
    """Shared machinery: N data keys, each backed by one 1-D HDF5 dataset of one file."""

    def __init__(
        self,
        path: str,
        datasets: dict[str, str],
        data_keys: dict[str, dict[str, Any]],
        index: Callable[[], int],
        chunk_samples: int | None,
    ) -> None:
        self.path = os.path.abspath(path)
        self._datasets = datasets  # data_key -> dataset path inside the file
        self._data_keys = data_keys
        self._index = index
        self._chunk_samples = chunk_samples
        self._compose: dict[str, ComposeStreamDatum] = {}
        self._emitted = 0

    @property
    def data_keys(self) -> tuple[str, ...]:
        return tuple(self._data_keys)

    @property
    def emitted(self) -> int:
        """Index up to which StreamDatums were emitted."""
        return self._emitted

    def describe(self) -> dict[str, dict[str, Any]]:
        """Singly nested DataKeys (``{data_key: DataKey}``) for ``describe_collect``."""
        return {k: dict(v) for k, v in self._data_keys.items()}

    def get_index(self) -> int:
        """Rows readable on disk (flushes a live writer first)."""
        return self._index()

    @property
    def pending(self) -> bool:
        """Whether a collect would emit anything: the StreamResources (the first time), or
        StreamDatums for rows written since the last one."""
        return not self._compose or self.get_index() > self._emitted

    def collect_asset_docs(self, index: int | None = None) -> Iterator[AssetDoc]:
        """Yield one StreamResource per key (first call), then StreamDatums for [emitted, index)."""
        available = self.get_index()
        stop = available if index is None else min(int(index), available)
        if not self._compose:
            for key, dataset in self._datasets.items():
                parameters: dict[str, Any] = {"dataset": dataset, "swmr": True}
                if self._chunk_samples:
                    parameters["chunk_shape"] = [tiled_chunk_samples(self._chunk_samples)]
                bundle = ComposeStreamResource()(
                    mimetype=HDF5_MIMETYPE,
                    uri=file_uri(self.path),
                    data_key=key,
                    parameters=parameters,
                )
                self._compose[key] = bundle.compose_stream_datum
                yield "stream_resource", dict(bundle.stream_resource_doc)
        if stop > self._emitted:
            rng = StreamRange(start=self._emitted, stop=stop)
            for key in self._datasets:
                # Built from typed values: jsonschema would only cost time (the writer side
                # measured it at a few % of the acquisition process with 30 meters).
                yield "stream_datum", dict(self._compose[key](indices=rng, validate=False))
            self._emitted = stop


def _file_index(path: str, dataset: str) -> Callable[[], int]:
    def index() -> int:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return int(f[dataset].shape[0])

    return index


class StreamAssets(_DatasetStream):
    """Samples stream of one meter file: one data key per channel plus ``<prefix>_time``.

    ``source`` is a live :class:`WaveformWriter` (``get_index`` is then its
    :meth:`~WaveformWriter.live_index`: the rows of whole chunks written so far) or the path
    of a finished meter file (channels and units are read from its attributes).
    ``channels`` restricts the keys to a subset of the file's channels.
    """

    def __init__(
        self,
        source: WaveformWriter | str | os.PathLike[str],
        prefix: str,
        channels: Sequence[str] | None = None,
        *,
        include_time: bool = True,
        source_label: str | None = None,
    ) -> None:
        if isinstance(source, WaveformWriter):
            writer = source
            path = writer.path
            all_channels, all_units = writer.channels, writer.units
            meter = writer.meter_name
            chunk: int | None = writer.chunk_samples

            def index() -> int:
                return writer.live_index()
        else:
            path = os.path.abspath(os.fspath(source))
            with h5py.File(path, "r", libver="latest", swmr=True) as f:
                all_channels = tuple(json.loads(f.attrs["channels"]))
                all_units = tuple(json.loads(f.attrs["units"]))
                meter = str(f.attrs.get("meter_name") or os.path.basename(path))
                chunk = f[TIME_DATASET].chunks[0] if f[TIME_DATASET].chunks else None
            index = _file_index(path, TIME_DATASET)
        wanted = tuple(channels) if channels is not None else all_channels
        unknown = [c for c in wanted if c not in all_channels]
        if unknown:
            raise ValueError(
                f"smartmeter {meter}: channels {unknown} are not in this file "
                f"(it has {list(all_channels)})"
            )
        data_keys = stream_data_keys(
            prefix,
            wanted,
            [dict(zip(all_channels, all_units, strict=True))[c] for c in wanted],
            source_label or f"smartmeter:{meter}",
            include_time=include_time,
        )
        datasets = {f"{prefix}_{ch}": f"/{ch}" for ch in wanted}
        if include_time:
            datasets[f"{prefix}_{TIME_KEY_SUFFIX}"] = f"/{TIME_DATASET}"
        self.prefix = prefix
        self.meter_name = meter
        self.time_key: str | None = f"{prefix}_{TIME_KEY_SUFFIX}" if include_time else None
        super().__init__(path, datasets, data_keys, index, chunk)


class GapAssets(_DatasetStream):
    """Gaps stream of one meter file: one row per :meth:`WaveformWriter.record_gap`."""

    def __init__(
        self,
        source: WaveformWriter | str | os.PathLike[str],
        prefix: str,
        *,
        source_label: str | None = None,
    ) -> None:
        if isinstance(source, WaveformWriter):
            writer = source
            path, meter = writer.path, writer.meter_name

            def index() -> int:
                writer.live_index()
                return writer.gaps_written
        else:
            path = os.path.abspath(os.fspath(source))
            meter = os.path.basename(path)
            index = _file_index(path, f"/{GAPS_GROUP}/{GAP_FIELDS[0]}")
        data_keys = gap_data_keys(prefix, source_label or f"smartmeter:{meter}")
        datasets = {gap_key(prefix, name): f"/{GAPS_GROUP}/{name}" for name in GAP_FIELDS}
        self.prefix = prefix
        self.meter_name = meter
        super().__init__(path, datasets, data_keys, index, None)


def gap_key(prefix: str, field: str) -> str:
    """Data key of one gap field (``field`` in ``GAP_FIELDS``) for a prefix."""
    if field not in GAP_FIELDS:
        raise ValueError(f"unknown gap field {field!r}; expected one of {GAP_FIELDS}")
    return f"{prefix}_{GAP_KEY_INFIX}{field}"


def stream_data_keys(
    prefix: str,
    channels: Sequence[str],
    units: Sequence[str],
    source_label: str,
    *,
    include_time: bool = True,
) -> dict[str, dict[str, Any]]:
    """Singly nested DataKeys of a samples stream, computable before any file exists.

    A device needs them in ``describe_collect`` at ``declare_stream`` time, which normally
    comes before ``kickoff`` creates the :class:`WaveformWriter`.
    """
    if len(channels) != len(units):
        raise ValueError(f"{len(channels)} channels but {len(units)} units")
    data_keys: dict[str, dict[str, Any]] = {}
    for ch, unit in zip(channels, units, strict=True):
        data_keys[f"{prefix}_{ch}"] = {
            "source": f"{source_label}/{ch}",
            "dtype": "number",
            "dtype_numpy": "<f4",
            "shape": [],
            "units": unit,
            "external": "STREAM:",
        }
    if include_time:
        data_keys[f"{prefix}_{TIME_KEY_SUFFIX}"] = {
            "source": f"{source_label}/{TIME_DATASET}",
            "dtype": "number",
            "dtype_numpy": "<f8",
            "shape": [],
            "units": "s",
            "external": "STREAM:",
        }
    return data_keys


def gap_data_keys(prefix: str, source_label: str) -> dict[str, dict[str, Any]]:
    """Singly nested DataKeys of a gaps stream (see the module docstring)."""
    return {
        gap_key(prefix, name): {
            "source": f"{source_label}/{GAPS_GROUP}/{name}",
            "dtype": "integer",
            "dtype_numpy": "<i8",
            "shape": [],
            "external": "STREAM:",
        }
        for name in GAP_FIELDS
    }
