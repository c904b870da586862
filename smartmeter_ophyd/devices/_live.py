"""The ``<meter>_live`` stream: a low-rate summary of a fly, for people watching it.

Intent: a fly records waveforms at up to 32 kHz into HDF5; nobody can watch that.  While
the samples are written, :class:`LiveSummary` folds them into windows of ``period_s`` of
samples (by count: ``rate * period_s`` samples) and computes, per window, what a person
reads off a meter: RMS voltage and current per line, active power per line and in total,
and the mains frequency (from the L1 voltage's rising zero crossings, interpolated).  The
windows are collected as ordinary events (``EventPageCollectable``) with hints, so
``BestEffortCallback`` tables and plots a fly live.

The window's time (``<meter>_live_time``) is the meter's: ``start_ts`` + first index /
rate, the nominal axis (the final, modelled axis is in the HDF5 file); events' own
timestamps are when the host computed them.  Gaps are not bridged: a window that holds a
declared gap covers fewer real samples and says so in ``<meter>_live_samples``.

Limits: only waveform measures give all fields (§4.2): single-line modes fill their line,
latched modes (``p,q``, ``v,i_RMS``) pass their own values through as window means.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from ..protocol import Measures
from ._keys import scalar_key

if TYPE_CHECKING:
    from ._smartmeter import SmartMeter

LIVE_FIELDS: Final = {
    "time": ("s", False),
    "samples": ("", False),
    "v_l1_rms": ("V", True), "v_l2_rms": ("V", True), "v_l3_rms": ("V", True),
    "i_l1_rms": ("mA", False), "i_l2_rms": ("mA", False), "i_l3_rms": ("mA", False),
    "p_l1": ("W", False), "p_l2": ("W", False), "p_l3": ("W", False),
    "p_total": ("W", True),
    "frequency": ("Hz", True),
}
"""Field -> (units, hinted)."""
DEFAULT_PERIOD_S: Final = 1.0
MAX_WINDOWS_KEPT: Final = 3600
"""Windows held in memory: an hour at 1 s, in a ring of float64 rows (104 B a window, 374 kB
a meter at most, its pages touched as it fills).  Older ones are overwritten, collected or
not (the samples themselves are all in the HDF5 file)."""
_FIELDS: Final = tuple(LIVE_FIELDS)


def _frequency(v: npt.NDArray[np.float64], rate: float) -> float:
    """Mains frequency from rising zero crossings with linear interpolation (NaN if < 2)."""
    below = v[:-1] < 0.0
    rising = np.flatnonzero(below & (v[1:] >= 0.0))
    if rising.size < 2:
        return math.nan
    frac = -v[rising] / (v[rising + 1] - v[rising])
    crossings = rising + frac
    return float((crossings.size - 1) * rate / (crossings[-1] - crossings[0]))


class LiveSummary:
    """Per-window summaries of a meter's current fly (see the module docstring).

    :meth:`add` runs on the I/O thread that writes the samples; :meth:`collect_pages` on the
    RunEngine's.  ``start_ts``/``rate`` come from the sample reply via :meth:`start`.
    """

    def __init__(self, meter: SmartMeter, period_s: float = DEFAULT_PERIOD_S) -> None:
        if not (math.isfinite(period_s) and period_s > 0):
            raise ValueError(f"live period {period_s!r} must be a positive number of seconds")
        self.meter = meter
        self.parent = None
        self.period_s = period_s
        self._lock = threading.Lock()
        # A ring: window n of the fly is row n % MAX_WINDOWS_KEPT (allocated on first start)
        self._rows = np.empty((0, len(_FIELDS)))
        self._times = np.empty(0)
        self._count = 0
        """Windows of the current fly so far."""
        self._emitted = 0
        """Windows of the current fly collected so far (or overwritten before)."""
        self._pending: list[npt.NDArray[np.float32]] = []
        self._pending_n = 0
        self._index = 0
        self._measures = Measures.VI
        self._rate = 0
        self._start_ts = 0.0
        self._window = 0

    @property
    def name(self) -> str:
        return f"{self.meter.name}_live"

    def start(self, measures: Measures, rate: int, start_ts: float) -> None:
        """A new fly: forget the last one's windows."""
        with self._lock:
            if self._rows.shape[0] == 0:
                self._rows = np.empty((MAX_WINDOWS_KEPT, len(_FIELDS)))
                self._times = np.empty(MAX_WINDOWS_KEPT)
            self._count = self._emitted = 0
        self._pending, self._pending_n, self._index = [], 0, 0
        self._measures, self._rate, self._start_ts = measures, int(rate), float(start_ts)
        self._window = max(1, int(round(rate * self.period_s)))

    def add(self, values: npt.NDArray[np.float32]) -> None:
        """Samples as written (``(n, channels)``); emits every window they complete."""
        if self._rate <= 0 or values.shape[0] == 0:
            return
        self._pending.append(values)
        self._pending_n += values.shape[0]
        while self._pending_n >= self._window:
            joined = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            window, rest = joined[: self._window], joined[self._window :]
            self._pending = [rest] if rest.shape[0] else []
            self._pending_n = rest.shape[0]
            self._emit(window)

    def finish(self) -> None:
        """The fly ended: summarise what is left as a last, shorter window."""
        if self._pending_n:
            joined = np.concatenate(self._pending)
            self._pending, self._pending_n = [], 0
            self._emit(joined)

    def _emit(self, window: npt.NDArray[np.float32]) -> None:
        row = self._summarise(window)
        row["time"] = self._start_ts + self._index / self._rate
        row["samples"] = float(window.shape[0])
        self._index += window.shape[0]
        values = [row[f] for f in _FIELDS]
        with self._lock:
            at = self._count % MAX_WINDOWS_KEPT
            self._rows[at] = values
            self._times[at] = time.time()
            self._count += 1

    def _summarise(self, window: npt.NDArray[np.float32]) -> dict[str, float]:
        row = dict.fromkeys(LIVE_FIELDS, math.nan)
        channels = self._measures.channels
        # one contiguous float64 row per channel: means of squares and products are dot
        # products (BLAS), not strided temporaries
        columns = np.array(window.T, dtype=np.float64, order="C")
        n = columns.shape[1]
        if self._measures.latched:
            for j, channel in enumerate(channels):
                key = {"vrms": "v", "irms": "i"}.get(channel[:4], "")
                if key:
                    row[f"{key}_{channel[-2:]}_rms"] = float(columns[j].mean())
                elif channel.startswith("p_"):
                    row[channel] = float(columns[j].mean())
        else:
            for j in range(0, len(channels), 2):
                line = channels[j][-2:]
                v, i = columns[j], columns[j + 1]
                row[f"v_{line}_rms"] = math.sqrt(float(np.dot(v, v)) / n)
                row[f"i_{line}_rms"] = math.sqrt(float(np.dot(i, i)) / n)
                row[f"p_{line}"] = float(np.dot(v, i)) / n / 1000.0  # V x mA -> W
            row["frequency"] = _frequency(columns[0], self._rate)
        powers = [row[f"p_l{k}"] for k in (1, 2, 3) if not math.isnan(row[f"p_l{k}"])]
        row["p_total"] = float(sum(powers)) if powers else math.nan
        return row

    # ------------------------------------------------------------------ bluesky

    def _key(self, field: str) -> str:
        return f"{self.meter.name}_live_{field}"

    def _kept(self, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(rows, times) of the kept windows from window ``first`` on; call under the lock."""
        first = max(first, self._count - MAX_WINDOWS_KEPT)
        at = np.arange(first, self._count) % MAX_WINDOWS_KEPT
        return self._rows[at], self._times[at]

    @property
    def latest(self) -> dict[str, float] | None:
        """The last complete window (None before the first)."""
        with self._lock:
            if not self._count:
                return None
            row = self._rows[(self._count - 1) % MAX_WINDOWS_KEPT]
            return dict(zip(_FIELDS, row.tolist(), strict=True))

    @property
    def windows(self) -> list[dict[str, float]]:
        """The windows of the current fly so far (the last ``MAX_WINDOWS_KEPT``)."""
        with self._lock:
            rows, _times = self._kept()
        return [dict(zip(_FIELDS, row, strict=True)) for row in rows.tolist()]

    def describe(self) -> dict[str, dict[str, Any]]:
        return self.describe_collect()

    def read(self) -> dict[str, dict[str, Any]]:
        row = self.latest
        with self._lock:
            stamp = (float(self._times[(self._count - 1) % MAX_WINDOWS_KEPT]) if self._count
                     else time.time())
        return {
            self._key(f): {"value": math.nan if row is None else row[f], "timestamp": stamp}
            for f in LIVE_FIELDS
        }

    def trigger(self) -> Any:
        from ophyd.status import Status

        status = Status()
        status.set_finished()
        return status

    def describe_configuration(self) -> dict[str, dict[str, Any]]:
        return {}

    def read_configuration(self) -> dict[str, dict[str, Any]]:
        return {}

    @property
    def hints(self) -> dict[str, list[str]]:
        return {"fields": [self._key(f) for f, (_u, hinted) in LIVE_FIELDS.items() if hinted]}

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        return {
            self._key(field): scalar_key(f"{self.meter.source_label}/live/{field}", "number",
                                         "<f8", units)
            for field, (units, _hinted) in LIVE_FIELDS.items()
        }

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows, times = self._kept(self._emitted)
            self._emitted = self._count
        if not rows.shape[0]:
            return
        data = {self._key(f): rows[:, j].tolist() for j, f in enumerate(_FIELDS)}
        stamps = times.tolist()
        yield {"data": data, "timestamps": {k: list(stamps) for k in data}, "time": stamps}
