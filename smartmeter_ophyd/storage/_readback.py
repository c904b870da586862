"""Read meter runs back: whole streams, time windows, and a NaN-marked regular grid.

Intent: give users the three views they need without loading an hour of 8 kHz data to look at
one second of it.

* :func:`read_stream` - a run's samples stream as an ``xarray.Dataset`` whose ``time``
  dimension carries the meter's **absolute time** as coordinate (TiledWriter names the
  dimension ``time`` but gives it no coordinate; the time is the ``<prefix>_time`` key) and a
  ``sample_index`` coordinate.
* :func:`time_window` - the samples with ``t0 <= time < t1`` through the catalog.  The window
  is located by searching the time array with a few *partial* reads (interpolation search with
  a bisection fallback; the time array is non-decreasing by construction), then each channel's
  ``ArrayClient`` is sliced, so only the window travels.  :func:`time_window_hdf5` does the same
  directly on a meter file.
* :func:`nan_grid` / :func:`gap_grid` - the **explicitly labelled** regular-grid view: every
  sample-clock position gets a row and positions lost in a declared gap are NaN (the stored
  data never contain NaN or fill values).  Times of missing positions are interpolated between
  their received neighbours on the sample clock (exact for uniform rates; for bursty rates the
  missing rows' time labels are approximate).  Gaps whose size is unknown
  (``missing_samples == -1``) cannot be placed on a grid and raise ``ValueError``.

Every view keeps ``attrs["first_index"]`` (index of its first sample in the stream) so a window
can be related back to the full stream and the gaps table.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import h5py
import numpy as np
import numpy.typing as npt
import xarray as xr

from ._documents import GAP_KEY_INFIX, TIME_KEY_SUFFIX, gap_key
from ._hdf5 import GAP_FIELDS, GAPS_GROUP, TIME_DATASET, UNKNOWN_MISSING

logger = logging.getLogger(__name__)

GRID_VIEW_LABEL: Final = "regular grid; NaN marks samples declared missing in the gaps table"
_SEARCH_WINDOW: Final = 4096

ReadRange = Callable[[int, int], npt.NDArray[np.float64]]


# ------------------------------------------------------------------------ locating keys


def _stream_keys(container: Any) -> list[str]:
    return [str(k) for k in container]


def find_time_key(keys: Sequence[str], prefix: str | None = None) -> str:
    """The ``<prefix>_time`` key among ``keys`` (the only one if ``prefix`` is None)."""
    if prefix is not None:
        key = f"{prefix}_{TIME_KEY_SUFFIX}"
        if key not in keys:
            raise KeyError(f"no time key {key!r} in stream keys {list(keys)}")
        return key
    candidates = [k for k in keys if k.endswith(f"_{TIME_KEY_SUFFIX}") and GAP_KEY_INFIX not in k]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell which time key to use among {candidates or list(keys)}; pass prefix="
        )
    return candidates[0]


def _prefix_of(time_key: str) -> str:
    return time_key[: -len(TIME_KEY_SUFFIX) - 1]


def _channel_keys(keys: Sequence[str], time_key: str, wanted: Sequence[str] | None) -> list[str]:
    prefix = _prefix_of(time_key) + "_"
    own = [k for k in keys if k.startswith(prefix) and k != time_key]
    if wanted is None:
        return own
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise KeyError(f"keys {missing} are not in the stream (it has {list(keys)})")
    return list(wanted)


# ------------------------------------------------------------------------ searching time


def search_sorted(read: ReadRange, n: int, t: float, side: str = "left") -> int:
    """``numpy.searchsorted`` on a non-decreasing array of length ``n`` read in pieces.

    ``read(a, b)`` returns elements ``a:b``.  Interpolation picks a window of
    ``_SEARCH_WINDOW`` elements; when the answer is outside it the bounds shrink and the
    next guess is a bisection, so the number of reads is O(log n) at worst and ~2-3 for the
    near-linear time of a meter.
    """
    if side not in ("left", "right"):
        raise ValueError("side must be 'left' or 'right'")
    if n == 0:
        return 0
    lo, hi = 0, n  # answer in [lo, hi]
    t_lo = float(read(0, 1)[0])
    t_hi = float(read(n - 1, n)[0])
    if t < t_lo or (side == "left" and t == t_lo):
        return 0
    if t > t_hi or (side == "right" and t == t_hi):
        return n
    interpolate = True
    while hi - lo > _SEARCH_WINDOW:
        if interpolate and t_hi > t_lo:
            guess = lo + int((t - t_lo) / (t_hi - t_lo) * (hi - lo))
        else:
            guess = (lo + hi) // 2
        a = max(lo, guess - _SEARCH_WINDOW // 2)
        b = min(hi, a + _SEARCH_WINDOW)
        a = max(lo, b - _SEARCH_WINDOW)
        window = np.asarray(read(a, b))
        pos = int(np.searchsorted(window, t, side=side))
        if 0 < pos < len(window) or (pos == 0 and a == lo) or (pos == len(window) and b == hi):
            return a + pos
        if pos == 0:
            hi, t_hi = a, float(window[0])
        else:
            lo, t_lo = b, float(window[-1])
        interpolate = not interpolate  # alternate with bisection to bound the worst case
    window = np.asarray(read(lo, hi))
    return lo + int(np.searchsorted(window, t, side=side))


def _check_window(t0: float, t1: float) -> None:
    if not t1 >= t0:
        raise ValueError(f"time window needs t0 <= t1, got t0={t0!r}, t1={t1!r}")


def _dataset(
    columns: Mapping[str, npt.NDArray[Any]],
    times: npt.NDArray[np.float64],
    first_index: int,
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    index = np.arange(first_index, first_index + times.shape[0], dtype=np.int64)
    # No pandas index on "time": building one copies and sorts-checks every timestamp, which
    # cost as much as the read itself; use .sel after ds.set_xindex("time") if needed.
    coords = xr.Coordinates({"time": ("time", times), "sample_index": ("time", index)}, indexes={})
    return xr.Dataset(
        {k: ("time", v) for k, v in columns.items()},
        coords=coords,
        attrs={"first_index": first_index, **attrs},
    )


# ------------------------------------------------------------------------ catalog views


def read_stream(run: Any, stream: str = "meter", prefix: str | None = None) -> xr.Dataset:
    """A whole stream as ``xarray.Dataset`` with absolute ``time`` as coordinate."""
    ds = run[stream].read()
    time_key = find_time_key([str(k) for k in ds.data_vars], prefix)
    times = np.asarray(ds[time_key].values)
    ds = ds.drop_vars(time_key).assign_coords(
        time=("time", times), sample_index=("time", np.arange(times.shape[0], dtype=np.int64))
    )
    ds.attrs.update({"first_index": 0, "time_key": time_key, "stream": stream})
    return ds


def time_window(
    run: Any,
    t0: float,
    t1: float,
    stream: str = "meter",
    prefix: str | None = None,
    keys: Sequence[str] | None = None,
) -> xr.Dataset:
    """Samples with ``t0 <= time < t1`` of a catalog run, reading only that window."""
    _check_window(t0, t1)
    container = run[stream]
    all_keys = _stream_keys(container)
    time_key = find_time_key(all_keys, prefix)
    time_array = container[time_key]
    n = int(time_array.shape[0])

    def read(a: int, b: int) -> npt.NDArray[np.float64]:
        return np.asarray(time_array[a:b])

    i0 = search_sorted(read, n, t0, "left")
    i1 = search_sorted(read, n, t1, "left")
    columns = {k: np.asarray(container[k][i0:i1]) for k in _channel_keys(all_keys, time_key, keys)}
    times = read(i0, i1) if i1 > i0 else np.empty(0, dtype=np.float64)
    return _dataset(columns, times, i0, {"time_key": time_key, "stream": stream})


def read_gaps(run: Any, stream: str = "meter_gaps", prefix: str | None = None) -> dict[str, Any]:
    """The gaps stream of a run as ``{field: int64 array}`` (empty arrays if no gaps)."""
    if stream not in run:
        raise KeyError(
            f"run has no gaps stream {stream!r} (streams: {list(run)}); "
            "without it gaps are unknown, not absent"
        )
    container = run[stream]
    keys = _stream_keys(container)
    if prefix is None:
        prefixes = {k.split(f"_{GAP_KEY_INFIX}")[0] for k in keys if f"_{GAP_KEY_INFIX}" in k}
        if len(prefixes) > 1:
            raise ValueError(f"several meters in {stream!r}: {sorted(prefixes)}; pass prefix=")
        if not prefixes:
            return {f: np.empty(0, dtype=np.int64) for f in GAP_FIELDS}
        prefix = prefixes.pop()
    return {f: np.asarray(container[gap_key(prefix, f)][:], dtype=np.int64) for f in GAP_FIELDS}


def gap_grid(
    run: Any,
    stream: str = "meter",
    gaps_stream: str | None = None,
    prefix: str | None = None,
    t0: float | None = None,
    t1: float | None = None,
) -> xr.Dataset:
    """The NaN-marked regular-grid view of a catalog run (optionally of a time window)."""
    if t0 is None and t1 is None:
        ds = read_stream(run, stream, prefix)
    else:
        ds = time_window(
            run, -np.inf if t0 is None else t0, np.inf if t1 is None else t1, stream, prefix
        )
    time_prefix = _prefix_of(ds.attrs["time_key"])
    gaps = read_gaps(run, gaps_stream or f"{stream}_gaps", time_prefix)
    return nan_grid(ds, gaps)


# ------------------------------------------------------------------------ direct HDF5 views


def time_window_hdf5(
    path: str | os.PathLike[str], t0: float, t1: float, channels: Sequence[str] | None = None
) -> xr.Dataset:
    """Samples with ``t0 <= time < t1`` read directly from a meter file (SWMR-safe)."""
    _check_window(t0, t1)
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        tds = f[TIME_DATASET]
        n = int(tds.shape[0])

        def read(a: int, b: int) -> npt.NDArray[np.float64]:
            return np.asarray(tds[a:b])

        i0 = search_sorted(read, n, t0, "left")
        i1 = search_sorted(read, n, t1, "left")
        names = list(channels) if channels is not None else json.loads(f.attrs["channels"])
        columns = {ch: f[ch][i0:i1] for ch in names}
        times = read(i0, i1)
        attrs = {"path": os.fspath(path), "meter_name": str(f.attrs.get("meter_name", ""))}
    return _dataset(columns, times, i0, attrs)


def read_gaps_hdf5(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[np.int64]]:
    """The ``/gaps`` table of a meter file."""
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return {k: f[GAPS_GROUP][k][()] for k in GAP_FIELDS}


# ------------------------------------------------------------------------ the grid view


def nan_grid(ds: xr.Dataset, gaps: Mapping[str, npt.ArrayLike]) -> xr.Dataset:
    """Spread a samples view onto the sample clock, NaN where a declared gap lost samples.

    ``ds`` is a view from :func:`read_stream` / :func:`time_window` /
    :func:`time_window_hdf5` (``attrs["first_index"]`` and a ``time`` coordinate); ``gaps``
    has at least ``sample_index`` and ``missing_samples``.  Only gaps strictly inside the view
    (``first_index < sample_index < first_index + n``) insert rows; a gap at the view's edge
    belongs to its neighbour.  The result has a ``position`` dimension, a ``time`` coordinate,
    a boolean ``received`` coordinate and ``attrs["view"] == GRID_VIEW_LABEL``.
    """
    first = int(ds.attrs.get("first_index", 0))
    n = int(ds.sizes["time"])
    index = np.asarray(gaps["sample_index"], dtype=np.int64)
    missing = np.asarray(gaps["missing_samples"], dtype=np.int64)
    inside = (index > first) & (index < first + n)
    if np.any(missing[inside] == UNKNOWN_MISSING):
        bad = index[inside & (missing == UNKNOWN_MISSING)]
        raise ValueError(
            f"gaps of unknown size before samples {bad.tolist()} cannot be placed on a "
            "regular grid; split the window there"
        )
    shift = np.zeros(n, dtype=np.int64)
    for i, m in zip(index[inside] - first, missing[inside], strict=True):
        shift[i:] += m
    positions = np.arange(n, dtype=np.int64) + shift
    size = int(positions[-1]) + 1 if n else 0
    received = np.zeros(size, dtype=bool)
    received[positions] = True
    times = np.asarray(ds["time"].values, dtype=np.float64)
    grid_times = np.empty(size, dtype=np.float64)
    grid_times[positions] = times
    if size > n:
        holes = np.flatnonzero(~received)
        grid_times[holes] = np.interp(holes, positions, times)
    data_vars = {}
    for name, var in ds.data_vars.items():
        values = np.asarray(var.values)
        dtype = np.result_type(values.dtype, np.float32)
        column = np.full(size, np.nan, dtype=dtype)
        column[positions] = values
        data_vars[str(name)] = ("position", column, dict(var.attrs))
    sample_index = np.full(size, -1, dtype=np.int64)
    sample_index[positions] = np.arange(first, first + n, dtype=np.int64)
    return xr.Dataset(
        data_vars,
        coords={
            "time": ("position", grid_times),
            "received": ("position", received),
            "sample_index": ("position", sample_index),
        },
        attrs={**ds.attrs, "view": GRID_VIEW_LABEL},
    )
