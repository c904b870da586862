"""The ``<meter>_timing`` stream: every NTP sync a meter reports during a fly.

Intent: the time model and the people judging a run need the meter's own records - the
confidence of each sync (§6.2), and while sampling the ``Should be``/``is`` sample counts,
the offset, the ``From``/``To`` timestamps and the correction (§6.5) - including the sync the
firmware runs inside a scheduled ``sample`` (§6.4), which is what a scheduled start stands on.

:class:`TimingStream` is fed the meter's log lines on the client's loop (by the fly
controller, from ``arm`` on) and joins them into records with
:class:`~smartmeter_ophyd.client.SyncRecordAssembler`.  It is an ``EventPageCollectable``:
each ``collect`` emits the records completed since the last one as one event page.  All
values come from the log text (meter time); host receive times appear only as the events'
``timestamps``, which bluesky requires and which say when the host saw the line.

Limits: a sync whose lines are still incomplete when the fly ends is flushed as a record
with its ``problems`` filled in.  A line written inside a data frame is cut out of the frame
by the decoder and still arrives here (§4.6).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from ..client import SyncRecord, SyncRecordAssembler
from ..protocol import LogLine
from ._keys import scalar_key

if TYPE_CHECKING:
    from ._smartmeter import SmartMeter

TIMING_FIELDS: Final = {
    "confidence_ms": ("number", "<f8", "ms"),
    "avg_rate_hz": ("number", "<f8", "Hz"),
    "goal_samples": ("number", "<f8", ""),
    "total_samples": ("number", "<f8", ""),
    "offset_s": ("number", "<f8", "s"),
    "second_interrupts": ("number", "<f8", ""),
    "sampling_duration_s": ("number", "<f8", "s"),
    "from_ts": ("number", "<f8", "s"),
    "to_ts": ("number", "<f8", "s"),
    "correction": ("integer", "<i8", "samples"),
    "during_sampling": ("boolean", "|b1", ""),
    "sets_rtc": ("boolean", "|b1", ""),
    "problems": ("string", "<U0", ""),
}
"""Numbers are float64 so an absent value (a sync while idle) is NaN, never 0."""


class TimingStream:
    """The sync records of a meter's current fly, collected as ``<meter>_timing``."""

    def __init__(self, meter: SmartMeter) -> None:
        self.meter = meter
        self.parent = None
        self._lock = threading.Lock()
        self._assembler_lock = threading.Lock()
        self._assembler = SyncRecordAssembler()
        self._records: list[SyncRecord] = []
        self._times: list[float] = []
        self._emitted = 0
        self._background: set[tuple[float | None, int | None]] = set()

    @property
    def name(self) -> str:
        return f"{self.meter.name}_timing"

    @property
    def records(self) -> list[SyncRecord]:
        """Every record of the current fly so far (collected or not)."""
        with self._lock:
            return list(self._records)

    def mark_background(self, record: SyncRecord) -> None:
        """``meter.ntp`` ran this sync in the background: it did not write the RTC (§6.2)."""
        with self._lock:
            self._background.add(_identity(record))

    def sets_rtc(self, record: SyncRecord) -> bool:
        """Whether the sync wrote the meter's RTC, restarting its seconds (§6.2): every sync
        but the background ones ``meter.ntp`` sent (another client's are taken as blocking)."""
        with self._lock:
            return _identity(record) not in self._background

    def records_with_rtc(self) -> list[tuple[SyncRecord, bool]]:
        """Every record so far (a sync still waiting for lines is closed now), each with
        whether it wrote the RTC."""
        self.flush()
        return [(record, self.sets_rtc(record)) for record in self.records]

    @property
    def pending(self) -> bool:
        """Whether a ``collect`` now would emit records (a plan may skip it otherwise)."""
        with self._lock:
            return len(self._records) > self._emitted

    def reset(self) -> None:
        with self._assembler_lock:
            self._assembler = SyncRecordAssembler()
        with self._lock:
            self._records = []
            self._times = []
            self._emitted = 0
            self._background = set()

    def feed(self, line: LogLine) -> None:
        """On the client's loop: one log line of the meter."""
        with self._assembler_lock:
            record = self._assembler.feed(line)
        if record is not None:
            self._add(record)

    def flush(self) -> None:
        """Close a record still waiting for lines (at the end of a fly)."""
        with self._assembler_lock:
            record = self._assembler.flush()
        if record is not None:
            self._add(record)

    def _add(self, record: SyncRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._times.append(time.time())

    def _key(self, field: str) -> str:
        return f"{self.meter.name}_timing_{field}"

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        return {
            self._key(field): scalar_key(f"{self.meter.source_label}/log/{field}", dtype,
                                         dtype_numpy, units)
            for field, (dtype, dtype_numpy, units) in TIMING_FIELDS.items()
        }

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            new = self._records[self._emitted :]
            times = self._times[self._emitted :]
            self._emitted = len(self._records)
        if not new:
            return
        data: dict[str, list[Any]] = {self._key(f): [] for f in TIMING_FIELDS}
        for record in new:
            for field in TIMING_FIELDS:
                value = self.sets_rtc(record) if field == "sets_rtc" else _value(record, field)
                data[self._key(field)].append(value)
        yield {
            "data": data,
            "timestamps": {key: list(times) for key in data},
            "time": list(times),
        }


def _identity(record: SyncRecord) -> tuple[float | None, int | None]:
    return record.to_ts, record.total_samples


def _value(record: SyncRecord, field: str) -> Any:
    if field == "problems":
        return "; ".join(record.problems)
    if field == "during_sampling":
        return bool(record.during_sampling)
    value = getattr(record, field)
    if field == "correction":
        return int(value)
    return math.nan if value is None else float(value)
