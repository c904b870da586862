"""Pictures of a recorded run: the first mains cycles of every meter, and RMS over the run.

* :func:`plot_first_cycles` - L1 voltage and current of every meter over its first mains
  cycles, all on **one absolute time axis** (milliseconds after the earliest first sample):
  meters that started together lie on top of each other; a meter that started late, or
  whose clock is off, is visibly shifted.
* :func:`plot_rms` - per-second RMS voltage and current per line and total active power of
  every meter over the whole run (read chunk by chunk through
  :func:`~smartmeter_ophyd.readback.power_summary`).
* :func:`plot_overlay` - one channel of several meters over any time window, one call.
* :func:`plot_run` - both PNGs for a run into a directory; refuses to overwrite unless told.

Meters whose time counts from 0 (never NTP-synced, §6.1) cannot share an absolute axis with
synced meters: they are drawn in their own panel labelled as such, never shifted onto host
time.  Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from .readback import (
    SYNCED_SOURCE,
    axis_source,
    first_last_time,
    overlay,
    power_summary,
    run_meters,
)

MAINS_HZ: Final = 50.0
DEFAULT_CYCLES: Final = 5
PARTIAL: Final = 0.5
"""RMS plot: periods holding less than this fraction of the fullest one are left out."""
_LINE_COLOURS: Final = {"l1": "tab:brown", "l2": "black", "l3": "tab:grey"}


class PlotError(ValueError):
    """A plot cannot be made as asked (the message says why)."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _origin_label(t0: float, synced: bool) -> str:
    if synced:
        return f"ms after {_utc(t0)} (meter clocks)"
    return f"ms after sample time {t0:.3f} s (meter counted from 0, no NTP time)"


def plot_overlay(
    run: Any,
    channel: str = "v_l1",
    t0: float | None = None,
    t1: float | None = None,
    meters: Sequence[str] | None = None,
    *,
    ax: Any = None,
) -> Any:
    """Draw ``channel`` of several meters over ``[t0, t1)`` on one absolute time axis.

    ``t0`` defaults to the earliest first sample and ``t1`` to ``t0`` + five mains cycles.
    Returns the matplotlib ``Axes``.
    """
    plt = _pyplot()
    names = list(meters) if meters is not None else run_meters(run)
    if t0 is None:
        spans = [s for s in (first_last_time(run, m) for m in names) if s is not None]
        if not spans:
            raise PlotError("none of the meters recorded a sample")
        t0 = min(s[0] for s in spans)
    if t1 is None:
        t1 = t0 + DEFAULT_CYCLES / MAINS_HZ
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    data = overlay(run, channel, t0, t1, names)
    synced = all(da.attrs["time_source"] == SYNCED_SOURCE for da in data.values())
    for name, da in data.items():
        ax.plot((np.asarray(da["time"]) - t0) * 1e3, np.asarray(da), lw=1.2, label=name)
    unit = next((da.attrs.get("units", "") for da in data.values()), "")
    ax.set_xlabel(_origin_label(t0, synced))
    ax.set_ylabel(f"{channel} ({unit})" if unit else channel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", ncols=min(4, len(data)))
    return ax


def _groups(starts: dict[str, float]) -> list[tuple[bool, list[str]]]:
    """Meters on an absolute (synced) axis, then each unsynced meter on its own (``starts``:
    each meter's first sample time)."""
    names = list(starts)
    synced = [m for m in names if axis_source(starts[m]) == SYNCED_SOURCE]
    unsynced = [m for m in names if m not in synced]
    groups: list[tuple[bool, list[str]]] = [(True, synced)] if synced else []
    groups += [(False, [m]) for m in unsynced]
    return groups


def plot_first_cycles(
    run: Any,
    path: str | Path,
    *,
    cycles: int = DEFAULT_CYCLES,
    meters: Sequence[str] | None = None,
) -> Path:
    """PNG of the first ``cycles`` mains cycles (L1 voltage and current) of every meter."""
    plt = _pyplot()
    names = list(meters) if meters is not None else run_meters(run)
    spans = {m: first_last_time(run, m) for m in names}
    starts = {m: span[0] for m, span in spans.items() if span is not None}
    names = list(starts)
    if not names:
        raise PlotError("no meter recorded a sample: nothing to plot")
    groups = _groups(starts)
    fig, axes = plt.subplots(2, len(groups), figsize=(10 + 3 * (len(groups) - 1), 6.5),
                             sharex="col", squeeze=False, layout="constrained")
    width = cycles / MAINS_HZ
    for col, (synced, members) in enumerate(groups):
        t0 = min(starts[m] for m in members)
        t1 = max(starts[m] for m in members) + width
        t1 = min(t1, t0 + max(width, 1.0))
        for row, channel in enumerate(("v_l1", "i_l1")):
            ax = axes[row][col]
            plot_overlay(run, channel, t0, t1, members, ax=ax)
            if row == 0:
                ax.set_xlabel("")
                title = ("on one absolute time axis" if synced
                         else "NOT on the absolute axis: no NTP time")
                ax.set_title(f"First {cycles} mains cycles, L1 — {title}", fontsize="medium")
    uid = run.start.get("uid", "")[:8]
    fig.suptitle(f"run {uid}: {len(names)} meter(s)", fontsize="small", x=0.01, ha="left")
    return _save(fig, path)


def plot_rms(run: Any, path: str | Path, *, meters: Sequence[str] | None = None,
             period_s: float = 1.0) -> Path:
    """PNG of per-second RMS voltage, RMS current and total active power of every meter."""
    plt = _pyplot()
    names = list(meters) if meters is not None else run_meters(run)
    summaries = {}
    for name in names:
        if first_last_time(run, name) is not None:
            summaries[name] = power_summary(run, name, period_s)
    if not summaries:
        raise PlotError("no meter recorded a sample: nothing to plot")
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True, layout="constrained")
    synced = all(s.attrs["time_source"] == SYNCED_SOURCE for s in summaries.values())
    t0 = min(float(s["time"].values[0]) for s in summaries.values())
    styles = ["-", "--", ":", "-."]
    for k, (name, s) in enumerate(summaries.items()):
        # a period cut by the start, the end or a gap holds too few samples for an RMS
        s = s.isel(time=np.flatnonzero(s["samples"].values >= PARTIAL * s["samples"].max().item()))
        x = np.asarray(s["time"].values) - t0 + period_s / 2
        style = styles[k % len(styles)]
        for line, colour in _LINE_COLOURS.items():
            for ax, key in ((axes[0], f"v_{line}_rms"), (axes[1], f"i_{line}_rms")):
                if key in s:
                    values = np.asarray(s[key].values) / (1000.0 if key.startswith("i_") else 1)
                    ax.plot(x, values, style, color=colour, marker=".", ms=3,
                            label=f"{name} {line.upper()}")
        if "p_total" in s:
            axes[2].plot(x, np.asarray(s["p_total"].values) / 1000.0, style, marker=".", ms=3,
                         label=name)
    axes[0].set_ylabel("RMS voltage (V)")
    axes[1].set_ylabel("RMS current (A)")
    axes[2].set_ylabel("active power, total (kW)")
    origin = _utc(t0) + " (meter clocks)" if synced else f"{t0:.0f} s (meter counted from 0)"
    axes[2].set_xlabel(f"s after {origin}; one point per {period_s:g} s (periods with less "
                       f"than {PARTIAL:.0%} of their samples are not drawn)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="x-small", ncols=3)
    uid = run.start.get("uid", "")[:8]
    axes[0].set_title(f"run {uid}: RMS over the run", fontsize="medium")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_png_paths(run: Any, directory: str | Path) -> tuple[Path, Path]:
    """Where :func:`plot_run` writes: ``<dir>/<uid8>-first-cycles.png`` and ``-rms.png``."""
    uid = run.start["uid"][:8]
    base = Path(directory)
    return base / f"{uid}-first-cycles.png", base / f"{uid}-rms.png"


def plot_run(run: Any, directory: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Both PNGs of ``run`` into ``directory``; :class:`FileExistsError` unless ``overwrite``."""
    first, rms = run_png_paths(run, directory)
    existing = [p for p in (first, rms) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s); pass overwrite=True "
            "(--overwrite) to replace"
        )
    return [plot_first_cycles(run, first), plot_rms(run, rms)]
