"""One HDF5 file per meter per run: waveforms, absolute time, packet and gap bookkeeping.

Intent: the raw samples of a SmartMeter session land in an ordinary HDF5 file that h5py (or
any HDF5 reader) opens without bluesky; the catalog only *references* it (StreamResource /
StreamDatum, see ``_documents.py``).  The file is written with ``libver="latest"`` in SWMR
mode, so Tiled (or anyone) can read it while the run is going on.

Layout (all datasets 1-D, chunked, resizable; ``n`` samples, ``m`` frames, ``g`` gaps)::

    /<channel>              float32 (n,)   one per channel of the measures mode, firmware units
                                           (attrs: units, channel); names from protocol.Measures (§4.2)
    /time                   float64 (n,)   absolute unix time of each sample (see "Time model")
    /packets/first_sample   int64   (m,)   sample index of the first sample of each Data: frame
    /packets/packet         int64   (m,)   its packet number (§4.6)
    /gaps/sample_index      int64   (g,)   index of the first sample received *after* the gap
    /gaps/expected_packet   int64   (g,)   packet number that was due
    /gaps/received_packet   int64   (g,)   packet number that arrived instead
    /gaps/missing_samples   int64   (g,)   samples lost in the gap; -1 = unknown

Compression and chunks: channels, ``/time`` and ``/packets`` are Blosc2-compressed (zstd level
1, byte shuffle, via ``hdf5plugin``, which Tiled's HDF5 reader imports too); emulated 8 kHz
data takes ~14.5 B per sample instead of 32 (channels 1.7x, the time axis 100x+).  Chunks
hold ~2 s of samples (:func:`default_chunk_samples`) and the writer writes **whole chunks
only**, each compressed once: in SWMR mode HDF5 never reuses file space, so rewriting a
growing compressed chunk leaves its old copies behind as dead space (measured 48 B per sample
instead of 15.6 with a rewrite every 0.5 s).  Samples become visible to other readers chunk by
chunk (every ~2 s at 8 kHz; at low rates a chunk is at least 64 samples), the rest at
:meth:`WaveformWriter.close` - or at an explicit :meth:`WaveformWriter.flush`, which writes
the partial chunk now and pays that dead space once.  A short run costs no more per sample
than a long one: nothing is preallocated, and the last, partial chunk is compressed like the
others.  ``compression=None`` writes plain float32/float64.

Memory: a writer holds its chunk buffer and, in HDF5's chunk cache, up to ``rdcc_nbytes`` of
recently written chunks per dataset; the cache fills in the first minutes (the ``/packets``
tables' 4096-row chunks take ~6 min at 8 kHz: +1 MB per file) and is freed at close.  Rows
are written from the chunk buffer itself and ``/time`` in pieces of :data:`TIME_PIECE` rows,
so an append allocates no chunk-sized temporaries.  The compression filter does, on the I/O
thread, for every chunk (its output and Blosc2's context buffers, sizes varying with the
data).  With glibc's *dynamic* mmap threshold, the first such buffer freed raises the
threshold above them, and from then on they come from that thread's malloc arena, whose free
space grew without bound: 3 meters at 8 kHz, in a 40-minute replay of the I/O thread's
appends, +8 MB free in the arena (and growing) with the dynamic threshold, flat (1.6 MB) with
it fixed, flat without compression.  Importing this module therefore fixes the threshold at
glibc's default (:data:`MMAP_THRESHOLD`, ``mallopt(M_MMAP_THRESHOLD)``; large buffers are then
mapped and unmapped each time) unless ``MALLOC_MMAP_THRESHOLD_`` is set, which it respects.
HDF5's own caches (each open file's metadata cache, the process's free lists) would grow with
the chunks written; a writer bounds them (``_hdf5_memory``).

Blosc threads: importing this module sets ``BLOSC_NTHREADS=1`` unless it is set already
(the HDF5 Blosc2 filter reads it at every call).  The filter's default, one thread per core,
costs more than it gains on a host shared by many meters: measured here, compressing a
chunk set took 11.3 ms with the default and 4.8 ms with one thread, and reading back ran at
272 MB/s against 1346 MB/s.

Missing samples are **never** zero-filled or interpolated: the channel datasets hold exactly the
samples received, and a gap is a row in ``/gaps``.  Only the explicitly labelled NaN-grid view of
``_readback.py`` shows gaps as NaN.

File attributes: ``compression``, ``meter_name``, ``meter_host``, ``firmware``, ``compiled``,
``sampling_reply`` (JSON of the ``sample`` reply, §4.4), ``stop_summary`` (JSON of the
``stop`` reply, §4.8, written by :meth:`WaveformWriter.close`), ``measures``, ``rate``,
``start_ts``, ``start_ts_reply``, ``start_ts_source``, ``time_model``, ``sample_spacing_s``,
``time_exact``, ``format_version``.

Time origin: ``start_ts`` is the origin ``/time`` is computed from.  It starts as the sample
reply's ``startTs`` (``start_ts_reply``; ``start_ts_source = "sample reply startTs"``), which
is the real start of an immediate session (§4.4) but only the *scheduled* second of a
scheduled one: the firmware starts ≈1 ms earlier and reports the real start as ``start_ts`` in
the stop reply (§6.4 step 5, §4.8).  :meth:`WaveformWriter.rebase_start` then moves the origin:
it rewrites the ``/time`` rows already written and sets ``start_ts`` and ``start_ts_source``;
``start_ts_reply`` keeps the reply's value.

Time model (``time[i]``): let ``j = i + (missing samples declared before i)`` be the sample's
position on the meter's sample clock and ``r`` the rate.  Then
``time[i] = start_ts + j // r + (j % r) * spacing`` where

* uniform rates (§4.3: 32..8000 dividing 8000, 16000, 32000): ``spacing = 1/r``, which is
  exactly ``start_ts + j/r``;
* bursty decimated rates (1, 2, 4, 5, 8, 10, 16, 20, 25, 128, 256, 640, 1280, 3200, 6400):
  ``spacing = keep_every / internal_rate``: ``r`` samples at the decimated rate at the start of
  each second, then silence (the firmware's per-second counter, §4.3/§4.10);
* latched modes (p,q and v,i_RMS, §4.11): ``spacing = (1_000_000 // r)`` µs (the hardware
  timer period), re-aligned every second as the RTC does.

Limits (documented, not modelled): ``start_ts`` has millisecond resolution and is the meter's
own NTP-set clock (§4.4, §6.2); NTP rate corrections duplicate or drop up to 10 samples per sync
(§6.5) and RTC filler samples (§4.10) are indistinguishable from real ones, so ``time`` drifts
by up to that many sample periods until the next sync; the bursty/latched formulas assume an
RTC that re-aligns the burst every second (without an RTC a session stops after ``r`` samples,
§4.10, which the formula also describes correctly); a gap with unknown ``missing_samples``
cannot advance the clock, so later times are too early - the file then carries
``time_exact = False`` and a warning is logged.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt

from smartmeter_ophyd.protocol import Measures, decimation

from ._hdf5_memory import bound_metadata_cache, limit_block_free_lists

logger = logging.getLogger(__name__)

os.environ.setdefault("BLOSC_NTHREADS", "1")  # see "Blosc threads" in the module docstring

MMAP_THRESHOLD: Final = 128 * 1024
"""glibc's default mmap threshold, fixed at import (see "Memory" in the module docstring)."""
_M_MMAP_THRESHOLD: Final = -3  # mallopt's parameter number (malloc.h)


def _fix_mmap_threshold() -> bool:
    """``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` on glibc unless ``MALLOC_MMAP_THRESHOLD_`` is set;
    True if it was set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt (not glibc): nothing to fix
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


_fix_mmap_threshold()

FORMAT_VERSION: Final = 1
TIME_DATASET: Final = "time"
PACKETS_GROUP: Final = "packets"
GAPS_GROUP: Final = "gaps"
GAP_FIELDS: Final = ("sample_index", "expected_packet", "received_packet", "missing_samples")
PACKET_FIELDS: Final = ("first_sample", "packet")
START_SOURCE_REPLY: Final = "sample reply startTs"
"""``start_ts_source`` of a file whose origin is the sample reply's ``startTs`` (§4.4)."""
START_SOURCE_STOP_REPLY: Final = "stop reply start_ts"
"""``start_ts_source`` after :meth:`WaveformWriter.rebase_start` with the stop reply's value."""
DISK_RESERVE_BYTES: Final = 256 * 1024
"""Free space kept for the file's metadata: rows are refused before the disk is this full, so
the file can still be closed.  HDF5 cannot close a file whose metadata flush hits a full disk
(the id stays open and h5py may crash at garbage collection)."""
UNKNOWN_MISSING: Final = -1
"""Value of ``/gaps/missing_samples`` when the decoder could not tell how many samples were lost."""

_METADATA_ATTRS: Final = {
    "name": "meter_name",
    "host": "meter_host",
    "firmware": "firmware",
    "compiled": "compiled",
    "emulated": "emulated",
    "smartmeter_ophyd": "package_version",
    "sampling_reply": "sampling_reply",
}


COMPRESSION: Final = "blosc2-zstd1-shuffle"
"""The default ``compression`` of :class:`WaveformWriter` (see the module docstring)."""
MIN_CHUNK_SAMPLES: Final = 64
MAX_CHUNK_SAMPLES: Final = 65536
PACKET_CHUNK: Final = 4096
GAP_CHUNK: Final = 64
TIME_PIECE: Final = 4096
"""Rows of ``/time`` computed and written at once (32 KiB of float64)."""
TILED_CHUNK_SAMPLES: Final = 262144
"""What Tiled is told the chunks are (a multiple of the HDF5 chunk): its HDF5 adapter
reopens the file for every chunk a request touches, so it reads in large pieces."""


def default_chunk_samples(rate: int) -> int:
    """HDF5 chunk length in samples: ~2 s of data, a power of two in [64, 65536].

    The chunk is the unit of compression and of live visibility (only whole chunks are
    written while the run goes on): 2 s is about what compression needs to reach its ratio
    (8192-sample chunks: 15.0 B/sample, 16384: 14.5, 65536: 13.9) and keeps live readers at
    most ~2 s behind at 8 kHz.
    """
    target = max(MIN_CHUNK_SAMPLES, min(MAX_CHUNK_SAMPLES, 2 * int(rate)))
    return 1 << (target - 1).bit_length()


def tiled_chunk_samples(chunk_samples: int) -> int:
    """The chunk length Tiled reads by: the smallest multiple of the HDF5 chunk >= 262144."""
    return chunk_samples * max(1, -(-TILED_CHUNK_SAMPLES // chunk_samples))


def _filter(compression: str | None) -> dict[str, Any]:
    if compression is None:
        return {}
    if compression == COMPRESSION:
        return dict(hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE))
    raise ValueError(f"unknown compression {compression!r}; use {COMPRESSION!r} or None")


def time_spacing(measures: Measures, rate: int) -> tuple[str, float]:
    """(time model name, spacing in seconds between samples inside one second of the meter)."""
    if measures.latched:
        return "latched", (1_000_000 // rate) * 1e-6
    dec = decimation(rate)
    if dec.uniform:
        return "uniform", 1.0 / rate
    return "bursty", dec.keep_every / dec.internal_rate


def sample_times(
    start_ts: float, rate: int, spacing: float, positions: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """Absolute times of sample-clock positions (see the module's "Time model")."""
    seconds, within = np.divmod(positions, rate)
    return start_ts + (seconds.astype(np.float64) + within.astype(np.float64) * spacing)


class WaveformWriter:
    """Write one meter's samples of one run into an HDF5 file (thread-safe).

    ``append`` may be called from a reader thread while ``samples_written`` /
    ``flush`` are called from the RunEngine thread.  Appends are buffered; every chunk that
    fills up is written and SWMR-flushed at once (by the appending thread), and only then
    does :attr:`samples_written` advance, so an index reported to bluesky is always readable
    by another process and reading it costs no I/O.  :meth:`live_index` is the index for a
    flyer's ``get_index``: it writes a partial chunk only when rows have waited too long.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        measures: Measures,
        rate: int,
        start_ts: float,
        meter_metadata: Mapping[str, Any] | None = None,
        *,
        chunk_samples: int | None = None,
        compression: str | None = COMPRESSION,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.measures = measures
        self.rate = int(rate)
        self.start_ts = float(start_ts)
        self.meter_metadata = dict(meter_metadata or {})
        self.meter_name = str(self.meter_metadata.get("name", os.path.basename(self.path)))
        if self.rate <= 0:
            raise ValueError(f"smartmeter {self.meter_name}: rate must be positive, not {rate}")
        if not math.isfinite(self.start_ts):
            raise ValueError(
                f"smartmeter {self.meter_name}: start_ts must be finite, not {start_ts}"
            )
        self.channels: tuple[str, ...] = measures.channels
        self.units: tuple[str, ...] = measures.units
        self.time_model, self.spacing = time_spacing(measures, self.rate)
        self.chunk_samples = chunk_samples or default_chunk_samples(self.rate)
        self.compression = compression
        self._filter = _filter(compression)

        self._lock = threading.RLock()
        self._buffer = np.empty((self.chunk_samples, len(self.channels)), dtype=np.float32)
        self._buffered = 0
        self._on_disk = 0  # rows written to the datasets (not necessarily SWMR-flushed)
        self._flushed = 0  # rows visible to SWMR readers
        self._pending_packets: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        self._pending_gaps: list[tuple[int, int, int, int]] = []
        self._gaps: list[tuple[int, int, int, int]] = []
        self._time_exact = True
        self._closed = False
        self._last_write = time.monotonic()  # when rows last became visible (or creation)

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # A chunk cache holding a few chunks per dataset keeps partial-chunk flushes in memory.
        self._file = h5py.File(
            self.path,
            "w",
            libver="latest",
            rdcc_nbytes=4 * 8 * self.chunk_samples,
            rdcc_nslots=10007,
        )
        try:
            limit_block_free_lists()
            bound_metadata_cache(self._file)
            self._create_layout()
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise
        logger.debug("smartmeter %s: writing %s", self.meter_name, self.path)

    # ------------------------------------------------------------------ layout

    def _create_layout(self) -> None:
        f = self._file
        chunk = (self.chunk_samples,)
        self._channel_ds = []
        for name, unit in zip(self.channels, self.units, strict=True):
            ds = f.create_dataset(
                name, (0,), maxshape=(None,), dtype="<f4", chunks=chunk, **self._filter
            )
            ds.attrs["units"] = unit
            ds.attrs["channel"] = name
            self._channel_ds.append(ds)
        self._time_ds = f.create_dataset(
            TIME_DATASET, (0,), maxshape=(None,), dtype="<f8", chunks=chunk, **self._filter
        )
        self._time_ds.attrs["units"] = "s"
        self._time_ds.attrs["description"] = "unix time of each sample, from the meter's start_ts"
        # Packets: one row per frame, compressed (they are arithmetic runs), written in whole
        # chunks like the samples.  Gaps: rare, uncompressed (rewritten in place, no dead
        # space), so each one is visible as soon as the next chunk of samples is.
        packets = f.create_group(PACKETS_GROUP)
        self._packet_ds = {
            k: packets.create_dataset(k, (0,), maxshape=(None,), dtype="<i8",
                                      chunks=(PACKET_CHUNK,), **self._filter)
            for k in PACKET_FIELDS
        }
        gaps = f.create_group(GAPS_GROUP)
        self._gap_ds = {
            k: gaps.create_dataset(k, (0,), maxshape=(None,), dtype="<i8", chunks=(GAP_CHUNK,))
            for k in GAP_FIELDS
        }
        attrs = f.attrs
        attrs["format_version"] = FORMAT_VERSION
        attrs["compression"] = self.compression or "none"
        attrs["measures"] = self.measures.reported
        attrs["channels"] = json.dumps(list(self.channels))
        attrs["units"] = json.dumps(list(self.units))
        attrs["rate"] = self.rate
        attrs["start_ts"] = self.start_ts
        attrs["start_ts_reply"] = self.start_ts
        attrs["start_ts_source"] = START_SOURCE_REPLY
        attrs["time_model"] = self.time_model
        attrs["sample_spacing_s"] = self.spacing
        attrs["time_exact"] = True
        for key, attr in _METADATA_ATTRS.items():
            value = self.meter_metadata.get(key)
            if value is None:
                attrs[attr] = ""
            elif isinstance(value, str):
                attrs[attr] = value
            else:
                attrs[attr] = json.dumps(value)
        attrs["stop_summary"] = ""

    # ------------------------------------------------------------------ public API

    @property
    def samples_written(self) -> int:
        """Samples flushed to disk and visible to SWMR readers (use as ``get_index()``)."""
        with self._lock:
            return self._flushed

    @property
    def samples_appended(self) -> int:
        """Samples handed to :meth:`append` so far (flushed or still buffered)."""
        with self._lock:
            return self._on_disk + self._buffered

    @property
    def gaps(self) -> list[tuple[int, int, int, int]]:
        """All recorded gaps as (sample_index, expected, received, missing_samples)."""
        with self._lock:
            return list(self._gaps)

    @property
    def gaps_written(self) -> int:
        """Gap rows flushed to disk (the index of the gaps stream)."""
        with self._lock:
            return len(self._gaps) - len(self._pending_gaps)

    @property
    def closed(self) -> bool:
        return self._closed

    def append(
        self,
        values: npt.NDArray[np.float32],
        packets: npt.ArrayLike | None = None,
        frame_samples: npt.ArrayLike | None = None,
    ) -> None:
        """Append ``values`` (shape ``(n, channels)``, float32) received gap-free.

        ``packets``/``frame_samples`` (as in :class:`smartmeter_ophyd.protocol.Samples`) give the
        packet number and sample count of each frame; they must cover exactly ``n`` samples.
        """
        values = self._check_values(values)
        n = values.shape[0]
        with self._lock:
            self._check_open()
            first = self._on_disk + self._buffered
            if packets is not None or frame_samples is not None:
                self._pending_packets.append(self._frame_rows(first, n, packets, frame_samples))
            if n == 0:
                return
            # Rows fill the chunk buffer up to the next chunk boundary and are written from
            # it: no chunk-sized temporary per chunk (see "Memory" in the module docstring).
            wrote = False
            done = 0
            while done < n:
                room = self.chunk_samples - (self._on_disk + self._buffered) % self.chunk_samples
                take = min(room, n - done)
                self._buffer[self._buffered : self._buffered + take] = values[done : done + take]
                self._buffered += take
                done += take
                if take == room:
                    self._write_buffered()
                    wrote = True
            if wrote:
                self._publish()

    def record_gap(self, expected: int, received: int, missing_samples: int | None) -> None:
        """Declare that packets ``expected..received-1`` never arrived (§4.6 numbering).

        The gap sits before the next sample to be appended.  ``missing_samples=None`` means
        unknown; the time of later samples can then no longer be exact (see module docs).
        """
        expected, received = int(expected), int(received)
        if received <= expected:
            raise ValueError(
                f"smartmeter {self.meter_name}: a gap needs received > expected packet, "
                f"got expected={expected}, received={received}"
            )
        if missing_samples is None:
            missing = UNKNOWN_MISSING
        else:
            missing = int(missing_samples)
            if missing < 0:
                raise ValueError(
                    f"smartmeter {self.meter_name}: missing_samples must be >= 0 or None, "
                    f"not {missing_samples}"
                )
        with self._lock:
            self._check_open()
            row = (self._on_disk + self._buffered, expected, received, missing)
            self._gaps.append(row)
            self._pending_gaps.append(row)
            if missing == UNKNOWN_MISSING and self._time_exact:
                self._time_exact = False
                self._file.attrs["time_exact"] = False
                logger.warning(
                    "smartmeter %s: gap of unknown size before sample %d (packets %d..%d); "
                    "times after it are not exact",
                    self.meter_name,
                    row[0],
                    expected,
                    received - 1,
                )
            else:
                logger.info(
                    "smartmeter %s: gap before sample %d: packets %d..%d missing (%s samples)",
                    self.meter_name,
                    row[0],
                    expected,
                    received - 1,
                    "unknown" if missing < 0 else missing,
                )

    def rebase_start(
        self, actual_start_ts: float, source: str = START_SOURCE_STOP_REPLY, *,
        rewrite: bool = True,
    ) -> bool:
        """Move the time origin to ``actual_start_ts``; True if the origin changed.

        ``rewrite=False`` only records the new origin, for a caller that has rewritten
        ``/time`` itself (:meth:`rewrite_times`): each rewrite of compressed chunks leaves the
        old ones as dead space in the file.

        For scheduled starts, whose reply ``startTs`` is the scheduled second, not the start
        (§6.4 step 5): the ``/time`` rows already written are recomputed in chunks with the
        gap-aware time model (SWMR readers see them after the flush this does), later rows use
        the new origin, ``start_ts``/``start_ts_source`` are updated and ``start_ts_reply``
        keeps the reply's value.  The same origin again is a no-op.
        """
        actual = float(actual_start_ts)
        if not math.isfinite(actual):
            raise ValueError(
                f"smartmeter {self.meter_name}: the actual start_ts must be finite, "
                f"not {actual_start_ts!r}"
            )
        with self._lock:
            self._check_open()
            if actual == self.start_ts:
                return False
            previous = self.start_ts
            self.start_ts = actual
            if rewrite:
                for first in range(0, self._on_disk, self.chunk_samples):
                    last = min(first + self.chunk_samples, self._on_disk)
                    self._time_ds[first:last] = self._times(first, last)
                self._time_ds.flush()
            self._file.attrs["start_ts"] = actual
            self._file.attrs["start_ts_source"] = source
            rewritten = self._on_disk if rewrite else 0
        logger.info(
            "smartmeter %s: time origin moved from %.3f to %.3f (%+.3f ms, %s); "
            "%d time rows rewritten",
            self.meter_name,
            previous,
            actual,
            (actual - previous) * 1e3,
            source,
            rewritten,
        )
        return True

    def rewrite_times(
        self, times: npt.NDArray[np.float64], source: str, notes: Sequence[str] = ()
    ) -> None:
        """Replace ``/time`` with ``times`` (one per sample appended), e.g. from the time
        model once a run's records are complete; ``time_source``/``time_notes`` say whence.

        SWMR readers see the new axis after the next :meth:`flush`, or once the file is
        closed (what a fly's close does next).
        """
        times = np.asarray(times, dtype=np.float64)
        with self._lock:
            self._check_open()
            if times.shape != (self._on_disk + self._buffered,):
                raise ValueError(
                    f"smartmeter {self.meter_name}: {times.shape[0]} times for "
                    f"{self._on_disk + self._buffered} samples"
                )
            self._write_buffered(provisional_times=False)  # the loop below writes them
            for first in range(0, self._on_disk, self.chunk_samples):
                last = min(first + self.chunk_samples, self._on_disk)
                self._time_ds[first:last] = times[first:last]
            self._file.attrs["time_source"] = source
            self._file.attrs["time_notes"] = json.dumps(list(notes))
        logger.info("smartmeter %s: /time rewritten from %s", self.meter_name, source)

    def flush(self) -> int:
        """Write every buffered row now, SWMR-flush; return :attr:`samples_written`.

        A partial chunk written here is rewritten when more rows come; with compression its
        old copy stays in the file as dead space (see the module docstring).  The writer
        itself never needs this: whole chunks are written as they fill, the rest at close.
        """
        with self._lock:
            self._check_open()
            self._write_buffered()
            self._publish(whole_chunks=False)
            return self._flushed

    def live_index(self, max_lag_s: float = 5.0) -> int:
        """:attr:`samples_written`, after :meth:`flush` if rows have waited > ``max_lag_s``.

        For a flyer's ``get_index``: at 8 kHz a chunk fills every ~2 s, so this never writes;
        it does when the stream pauses (flow control, slots) or the rate is low.
        """
        with self._lock:
            if self._closed:
                return self._flushed
            if (self._buffered or self._pending_gaps) and (
                time.monotonic() - self._last_write > max_lag_s
            ):
                return self.flush()
            return self._flushed

    def flush_if_open(self) -> int:
        """:meth:`flush` while open, then :attr:`samples_written` (atomic w.r.t. :meth:`close`).

        Makes every appended row visible now (at the cost :meth:`flush` describes); a
        flyer's ``get_index`` wants :meth:`live_index`.
        """
        with self._lock:
            return self._flushed if self._closed else self.flush()

    def close(self, stop_summary: Mapping[str, Any] | None = None) -> None:
        """Write what is buffered, store the stop reply (§4.8) as JSON, and close the file
        (closing flushes every dataset: no SWMR flush first).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._check_open()
                self._write_buffered()
                self._write_tables(whole_chunks=False)
                self._flushed = self._on_disk
                if stop_summary is not None:
                    self._file.attrs["stop_summary"] = json.dumps(dict(stop_summary))
            finally:
                self._file.close()
                self._closed = True
        logger.debug(
            "smartmeter %s: closed %s with %d samples, %d gaps",
            self.meter_name,
            self.path,
            self._flushed,
            len(self._gaps),
        )

    def abandon(self) -> None:
        """Close the file without flushing (after a write error: the disk refuses more)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._buffered = 0
            try:
                self._file.close()
            except Exception as exc:  # closing what could not be written may fail too
                logger.warning("smartmeter %s: closing %s failed: %s", self.meter_name, self.path, exc)

    def __enter__(self) -> WaveformWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"smartmeter {self.meter_name}: {self.path} is already closed")

    def _check_values(self, values: Any) -> npt.NDArray[np.float32]:
        if not isinstance(values, np.ndarray):
            raise TypeError(
                f"smartmeter {self.meter_name}: values must be a numpy array, not {type(values).__name__}"
            )
        if values.dtype != np.float32:
            raise TypeError(
                f"smartmeter {self.meter_name}: values must be float32 as sent by the firmware "
                f"(§4.6), not {values.dtype}; converting would change the data"
            )
        if values.ndim != 2 or values.shape[1] != len(self.channels):
            raise ValueError(
                f"smartmeter {self.meter_name}: values must have shape (n, {len(self.channels)}) "
                f"for measures {self.measures.reported!r}, got {values.shape}"
            )
        return values

    def _frame_rows(
        self, first: int, n: int, packets: npt.ArrayLike | None, frame_samples: npt.ArrayLike | None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if packets is None or frame_samples is None:
            raise ValueError(
                f"smartmeter {self.meter_name}: packets and frame_samples must be given together"
            )
        pk = np.asarray(packets, dtype=np.int64).ravel()
        fs = np.asarray(frame_samples, dtype=np.int64).ravel()
        if pk.shape != fs.shape:
            raise ValueError(
                f"smartmeter {self.meter_name}: {pk.size} packet numbers but {fs.size} frame sizes"
            )
        if int(fs.sum()) != n or (fs.size and int(fs.min()) < 0):
            raise ValueError(
                f"smartmeter {self.meter_name}: frames carry {int(fs.sum())} samples but "
                f"{n} values were appended"
            )
        starts = first + np.concatenate(([0], np.cumsum(fs)[:-1])) if fs.size else fs
        return starts.astype(np.int64), pk

    def _publish(self, whole_chunks: bool = True) -> None:
        """Tables, then SWMR-flush every dataset: readers see all rows written so far."""
        self._write_tables(whole_chunks)
        for ds in (*self._channel_ds, self._time_ds):
            ds.flush()
        for ds in (*self._packet_ds.values(), *self._gap_ds.values()):
            ds.flush()
        self._flushed = self._on_disk
        self._last_write = time.monotonic()

    def _write_buffered(self, provisional_times: bool = True) -> None:
        if self._buffered:
            rows, self._buffered = self._buffered, 0
            self._write_rows(self._buffer[:rows], provisional_times)

    def _write_rows(self, values: npt.NDArray[np.float32], provisional_times: bool = True) -> None:
        """Channels and ``/time`` rows; without ``provisional_times`` the caller writes the
        rows' times before anything is flushed."""
        self._check_space(values.shape[0])
        start = self._on_disk
        stop = start + values.shape[0]
        for k, ds in enumerate(self._channel_ds):
            ds.resize((stop,))
            ds[start:stop] = values[:, k]
        self._time_ds.resize((stop,))
        if provisional_times:
            # in pieces (their chunk waits in HDF5's chunk cache and is compressed once, at
            # the flush): the time model's temporaries stay small (see "Memory")
            for first in range(start, stop, TIME_PIECE):
                last = min(first + TIME_PIECE, stop)
                self._time_ds[first:last] = self._times(first, last)
        self._on_disk = stop

    def _check_space(self, rows: int) -> None:
        """Raise ENOSPC, naming the file, unless ``rows`` fit uncompressed plus the reserve."""
        needed = rows * (4 * len(self._channel_ds) + 8) + DISK_RESERVE_BYTES
        stats = os.statvfs(os.path.dirname(self.path) or ".")
        free = stats.f_bavail * stats.f_frsize
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: {free} bytes free, {rows} samples need up to "
                f"{needed - DISK_RESERVE_BYTES} plus {DISK_RESERVE_BYTES} kept to close the file",
                self.path,
            )

    def _times(self, start: int, stop: int) -> npt.NDArray[np.float64]:
        positions = np.arange(start, stop, dtype=np.int64)
        for index, _, _, missing in self._gaps:
            if missing <= 0 or index >= stop:
                continue
            if index <= start:
                positions += missing
            else:
                positions[index - start :] += missing
        return sample_times(self.start_ts, self.rate, self.spacing, positions)

    def _write_tables(self, whole_chunks: bool) -> None:
        if self._pending_packets:
            starts = np.concatenate([p[0] for p in self._pending_packets])
            numbers = np.concatenate([p[1] for p in self._pending_packets])
            self._pending_packets.clear()
            written = self._packet_ds["packet"].shape[0]
            ready = starts.shape[0]
            if whole_chunks:
                ready = (written + ready) // PACKET_CHUNK * PACKET_CHUNK - written
            if ready < starts.shape[0]:
                self._pending_packets.append((starts[ready:], numbers[ready:]))
            if ready > 0:
                self._extend(self._packet_ds["first_sample"], starts[:ready])
                self._extend(self._packet_ds["packet"], numbers[:ready])
        if self._pending_gaps:
            rows = np.array(self._pending_gaps, dtype=np.int64).reshape(-1, len(GAP_FIELDS))
            self._pending_gaps.clear()
            for k, name in enumerate(GAP_FIELDS):
                self._extend(self._gap_ds[name], rows[:, k])

    @staticmethod
    def _extend(ds: h5py.Dataset, values: npt.NDArray[np.int64]) -> None:
        old = ds.shape[0]
        ds.resize((old + values.shape[0],))
        ds[old:] = values


def read_packets(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[np.int64]]:
    """The ``/packets`` table of a meter file as a dict of int64 arrays (SWMR-safe read)."""
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return {k: f[PACKETS_GROUP][k][()] for k in PACKET_FIELDS}
