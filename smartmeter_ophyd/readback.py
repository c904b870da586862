"""Read a recorded run back by time: each meter on its own absolute time axis.

Intent: ``run["meter1"].read()`` gives arrays indexed by row, and rows of two meters with
the same index are *not* the same instant.  These helpers give every meter's samples with
the meter's own absolute time as coordinate, so meters line up by time, never by index:

* :func:`run_meters` - the meters recorded in a run (from its start document);
* :func:`meter_rows` - a run's per-meter table (``meter_summary``, ``synchronization``) as
  rows per meter;
* :func:`meter_data` - one meter's samples (optionally only ``t0 <= time < t1``) as an
  ``xarray.Dataset`` with plain channel names (``v_l1``, ``i_l1``, …), a ``time``
  coordinate (unix seconds, float64) and ``sample_index``;
* :func:`overlay` - one channel of several meters over one time window, in one call: a dict
  of ``DataArray`` each on its own time coordinate (ready for one plot with a shared axis);
* :func:`power_summary` - the per-second (``period_s``) summary NILM tools read: RMS voltage
  and current, active and apparent power per line and in total, the mains frequency, and
  how many samples each second holds, computed chunk by chunk (never the whole run at once).

Time: the coordinate is what the meter's clock said (its NTP time, re-based on the real
start, see ``storage``); host receive times are never used.  A meter that had never synced
(``startTs`` 0.000, §6.1) counts from 0: :func:`time_source` says which it is, and the
datasets carry it as ``attrs["time_source"]``.  Samples lost in declared gaps are absent
(never filled); ``sample_index`` shows where.

Reading goes through the public functions of :mod:`smartmeter_ophyd.storage`
(:func:`~smartmeter_ophyd.storage.time_window`, :func:`~smartmeter_ophyd.storage.time_span`,
:func:`~smartmeter_ophyd.storage.child_keys`): one search request per meter and question,
then the HDF5 files the catalog references when they are local (the embedded catalog, a
server on this host), else Tiled's array endpoint.  Each request to Tiled costs tens of
milliseconds even in-process, so a meter is never read key by key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
import xarray as xr

UNSYNCED_BEFORE_S: Final = 1e9
"""Times below this (2001-09-09) cannot come from a synced clock: the meter counted from 0."""
SYNCED_SOURCE: Final = "meter clock (NTP-synchronised unix time)"
UNSYNCED_SOURCE: Final = (
    "meter sample clock counted from 0 (the meter had no NTP time, startTs 0.000, §6.1); "
    "not a unix time"
)
_UNITS: Final = {"v": "V", "i": "mA", "vrms": "V", "irms": "mA", "p": "W", "q": "var"}


_T = TypeVar("_T")


class ReadbackError(ValueError):
    """A run or meter cannot be read as asked; the message names the run and the meter."""


# ------------------------------------------------------------------------------- meters


def run_meters(run: Any) -> list[str]:
    """Names of the meters recorded in ``run`` (their sample streams), in recording order."""
    from .storage import child_keys

    start = run.start
    present = set(child_keys(run))  # one listing, not a request per meter
    streams = start.get("streams")
    if isinstance(streams, dict) and streams:
        names = [name for name, parts in streams.items() if parts.get("samples") in present]
    else:
        names = [name for name in start.get("detectors", []) if name in present]
    if not names:
        raise ReadbackError(
            f"run {start.get('uid', '?')[:8]} has no meter sample streams "
            f"(streams: {sorted(present)})"
        )
    return names


def meter_rows(table: Any) -> dict[str, list[dict[str, Any]]]:
    """A stored per-meter table as ``{meter: [row, ...]}``, rows in stored order (segment 0,
    1, ... of a paused and resumed fly).

    ``table`` maps column names to equal-length columns: ``run["meter_summary"].read()`` or
    ``run["synchronization"].read()`` (an ``xarray.Dataset``), a pandas DataFrame, an event
    page's ``data``.  Each row is a dict of plain Python values; NaN stays NaN ("not known").
    Raises :class:`ReadbackError` without a ``meter`` column.
    """
    if "meter" not in table:
        raise ReadbackError(f"not a per-meter table: no 'meter' column (columns: {list(table)})")
    columns = {str(key): np.asarray(table[key]).tolist() for key in table}
    out: dict[str, list[dict[str, Any]]] = {}
    for i, meter in enumerate(columns["meter"]):
        row = {key: values[i] for key, values in columns.items()}
        row["meter"] = str(meter)
        out.setdefault(str(meter), []).append(row)
    return out


def _reading(run: Any, meter: str, read: Callable[[], _T]) -> _T:
    """``read()``; a :class:`ReadbackError` naming the run's meters if ``meter`` has no
    stream in ``run`` (checked only when the read fails, so a good read costs no request)."""
    import httpx

    try:
        return read()
    except (KeyError, httpx.HTTPStatusError):
        if meter in run:
            raise
    raise ReadbackError(
        f"run {run.start.get('uid', '?')[:8]} has no stream for meter {meter!r}; "
        f"meters: {run_meters(run)}"
    )


def first_last_time(run: Any, meter: str) -> tuple[float, float] | None:
    """``(first, last)`` sample time of ``meter`` (None when it recorded no sample).

    One search request, then the two rows (see :func:`smartmeter_ophyd.storage.time_span`).
    """
    from .storage import time_span

    return _reading(run, meter, lambda: time_span(run, meter, prefix=meter))


def time_source(run: Any, meter: str) -> str:
    """What ``meter``'s time axis is: its NTP time, or a count from 0 (see module docstring)."""
    span = first_last_time(run, meter)
    return axis_source(None if span is None else span[0])


def axis_source(first: float | None) -> str:
    """What a time axis whose first sample is at ``first`` is: :data:`SYNCED_SOURCE`, or
    :data:`UNSYNCED_SOURCE` below :data:`UNSYNCED_BEFORE_S` (None: no sample, taken as
    synced)."""
    if first is not None and first < UNSYNCED_BEFORE_S:
        return UNSYNCED_SOURCE
    return SYNCED_SOURCE


# ------------------------------------------------------------------------------ samples


def _units(channel: str) -> str:
    return _UNITS.get(channel.split("_")[0], "")


def _plain(ds: xr.Dataset, meter: str, source: str) -> xr.Dataset:
    prefix = f"{meter}_"
    renamed = {
        name: str(name)[len(prefix):] for name in ds.data_vars if str(name).startswith(prefix)
    }
    out = ds.rename(renamed)
    for name in out.data_vars:
        unit = _units(str(name))
        if unit:
            out[name].attrs.setdefault("units", unit)
    out["time"].attrs.update({"units": "s", "long_name": "time", "time_source": source})
    out.attrs.update({"meter": meter, "time_source": source})
    return out


def meter_data(
    run: Any,
    meter: str,
    t0: float | None = None,
    t1: float | None = None,
    channels: Sequence[str] | None = None,
) -> xr.Dataset:
    """``meter``'s samples with ``t0 <= time < t1`` (the whole stream when both are None).

    Channels are named as the meter names them (``v_l1``, ``i_l1``, …; units in ``attrs``);
    ``channels`` picks some.  ``time`` is the meter's absolute time (see :func:`time_source`).
    """
    from .storage import time_window

    keys = None if channels is None else [f"{meter}_{c}" for c in channels]
    lo = -math.inf if t0 is None else float(t0)
    hi = math.inf if t1 is None else float(t1)
    ds = _reading(run, meter, lambda: time_window(run, lo, hi, meter, prefix=meter, keys=keys))
    if ds.sizes["time"]:
        source = axis_source(float(ds["time"].values[0]))
    else:
        source = time_source(run, meter)
    return _plain(ds, meter, source)


def overlay(
    run: Any,
    channel: str = "v_l1",
    t0: float | None = None,
    t1: float | None = None,
    meters: Sequence[str] | None = None,
) -> dict[str, xr.DataArray]:
    """``channel`` of several meters (default: all) over ``[t0, t1)``, each on its own time.

    The arrays share one absolute time axis by construction, so plotting them together shows
    how the meters really relate in time::

        for name, da in overlay(run, "v_l1", t0, t0 + 0.06).items():
            plt.plot(da["time"] - t0, da, label=name)
    """
    names = list(meters) if meters is not None else run_meters(run)
    out: dict[str, xr.DataArray] = {}
    for name in names:
        ds = meter_data(run, name, t0, t1, channels=[channel])
        da = ds[channel]
        da.name = name
        da.attrs.update({"channel": channel, "time_source": ds.attrs["time_source"]})
        out[name] = da
    return out


def iter_windows(
    run: Any, meter: str, chunk_s: float = 60.0, channels: Sequence[str] | None = None
) -> Iterator[xr.Dataset]:
    """``meter``'s samples in consecutive windows of ``chunk_s`` seconds of its time axis.

    Windows lie on multiples of ``chunk_s`` (so whole seconds never straddle two windows
    when ``chunk_s`` is a whole number of seconds); empty windows (gaps) are skipped.
    """
    if not (math.isfinite(chunk_s) and chunk_s > 0):
        raise ValueError(f"chunk_s={chunk_s!r} must be a positive number of seconds")
    yield from _windows(run, meter, first_last_time(run, meter), chunk_s, channels)


def _windows(run: Any, meter: str, span: tuple[float, float] | None, chunk_s: float,
             channels: Sequence[str] | None = None) -> Iterator[xr.Dataset]:
    if span is None:
        return
    first, last = span
    k = math.floor(first / chunk_s)
    while k * chunk_s <= last:
        ds = meter_data(run, meter, k * chunk_s, (k + 1) * chunk_s, channels=channels)
        if ds.sizes["time"]:
            yield ds
        k += 1


# ------------------------------------------------------------------------ power summary


def _line_pairs(channels: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(line, v channel, i channel)`` for waveform measures (§4.2)."""
    pairs = []
    for name in channels:
        if name.startswith("v_"):
            line = name[2:]
            if f"i_{line}" in channels:
                pairs.append((line, name, f"i_{line}"))
    return pairs


def _bin_edges(times: npt.NDArray[np.float64], period_s: float) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(bin number of each run of samples, start index of each run)``."""
    bins = np.floor(times / period_s).astype(np.int64)
    starts = np.flatnonzero(np.diff(bins, prepend=bins[0] - 1))
    return bins[starts], starts


def _frequency(times: npt.NDArray[np.float64], v: npt.NDArray[Any],
               starts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Mains frequency per bin from rising zero crossings, interpolated on the real times."""
    v = v.astype(np.float64)
    rising = np.flatnonzero((v[:-1] < 0.0) & (v[1:] >= 0.0))
    out = np.full(starts.shape[0], np.nan)
    if rising.size < 2:
        return out
    frac = -v[rising] / (v[rising + 1] - v[rising])
    crossing = times[rising] + frac * (times[rising + 1] - times[rising])
    ends = np.append(starts[1:], times.shape[0])
    lo = np.searchsorted(rising, starts, side="left")
    hi = np.searchsorted(rising, ends - 1, side="left")
    for b in np.flatnonzero(hi - lo >= 2):
        c = crossing[lo[b]:hi[b]]
        out[b] = (c.shape[0] - 1) / (c[-1] - c[0])
    return out


def _summarise(ds: xr.Dataset, period_s: float) -> dict[str, npt.NDArray[Any]]:
    times = np.asarray(ds["time"].values, dtype=np.float64)
    bins, starts = _bin_edges(times, period_s)
    counts = np.diff(np.append(starts, times.shape[0]))
    columns: dict[str, npt.NDArray[Any]] = {
        "time": bins.astype(np.float64) * period_s,
        "samples": counts.astype(np.int64),
    }
    channels = [str(c) for c in ds.data_vars]
    pairs = _line_pairs(channels)

    def mean(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.add.reduceat(x, starts) / counts

    if not pairs:  # latched measures (§4.2): the meter's own values, averaged per bin
        for name in channels:
            columns[name] = mean(np.asarray(ds[name].values, dtype=np.float64))
        return columns
    p_total = np.zeros(starts.shape[0])
    s_total = np.zeros(starts.shape[0])
    for line, vname, iname in pairs:
        v = np.asarray(ds[vname].values, dtype=np.float64)
        i = np.asarray(ds[iname].values, dtype=np.float64)
        v_rms = np.sqrt(mean(v * v))
        i_rms = np.sqrt(mean(i * i))
        p = mean(v * i) / 1000.0  # V x mA -> W
        s = v_rms * i_rms / 1000.0
        columns.update({f"v_{line}_rms": v_rms, f"i_{line}_rms": i_rms,
                        f"p_{line}": p, f"s_{line}": s})
        p_total += p
        s_total += s
    columns["p_total"] = p_total
    columns["s_total"] = s_total
    columns["frequency"] = _frequency(times, np.asarray(ds[pairs[0][1]].values), starts)
    return columns


SUMMARY_UNITS: Final = {"time": "s", "samples": "", "frequency": "Hz"}


def summary_units(column: str) -> str:
    """Units of a :func:`power_summary` column."""
    if column in SUMMARY_UNITS:
        return SUMMARY_UNITS[column]
    head = column.split("_")[0]
    return {"v": "V", "i": "mA", "p": "W", "s": "VA", "q": "var", "vrms": "V",
            "irms": "mA"}.get(head, "")


def power_summary(
    run: Any, meter: str, period_s: float = 1.0, chunk_s: float = 60.0
) -> xr.Dataset:
    """Per-``period_s`` summary of ``meter`` (see the module docstring), one row per period.

    ``time`` is the start of each period on the meter's axis (whole multiples of
    ``period_s``); ``samples`` is how many samples the period holds, so a period cut by a gap
    or by the run's start or end is visible as such.  Power is computed from the waveforms:
    ``p`` = mean(v·i), ``s`` = V_rms·I_rms; currents are in mA, powers in W and VA.
    """
    if not (math.isfinite(period_s) and period_s > 0):
        raise ValueError(f"period_s={period_s!r} must be a positive number of seconds")
    chunk = max(period_s, round(chunk_s / period_s) * period_s)
    span = first_last_time(run, meter)
    parts: list[dict[str, npt.NDArray[Any]]] = [
        _summarise(ds, period_s) for ds in _windows(run, meter, span, chunk)
    ]
    if not parts:
        raise ReadbackError(f"meter {meter!r} recorded no samples in this run")
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    times = columns.pop("time")
    data = {k: ("time", v, {"units": summary_units(k)} if summary_units(k) else {})
            for k, v in columns.items()}
    source = axis_source(None if span is None else span[0])
    return xr.Dataset(
        data, coords={"time": ("time", times, {"units": "s", "time_source": source})},
        attrs={"meter": meter, "period_s": period_s, "time_source": source},
    )
