"""Small collectables a fly adds to its run besides the samples.

* :class:`GapStream` - the gaps of a meter's current fly as its ``<meter>_gaps`` stream.
* :class:`TableStream` - a long table, one row per meter (per segment of a paused fly), a
  fixed set of columns whatever the fleet size, collected as one event page.
* :class:`MeterSummary` - the ``meter_summary`` table: each fly's reconciliation and the
  meter's configuration after it, one row per meter and segment.
* :class:`RunSummary` - one meter's row of it (``meter.run_summary``).
* :func:`summary_dict` - a :class:`~smartmeter_ophyd.client.SessionSummary` as JSON values.

Why tables: bluesky validates every descriptor and event against its schema (jsonschema).
One wide event with keys per meter (``<meter>_run_<field>``) made that cost grow with the
fleet: about 1 s of the RunEngine's thread at the end of a 50-meter run.  A table's
descriptor has the same dozen keys at 1 meter or 50, and its rows go in one page, validated
once.

Limits: a table holds scalars only (numbers, integers, booleans, strings); NaN in a number
column means "not known" (never zero); an integer count that is not known is -1.  Readers:
:func:`smartmeter_ophyd.readback.meter_rows` gives a stored table as rows per meter.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..client import SessionSummary

if TYPE_CHECKING:
    from ._smartmeter import SmartMeter


def jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_dict(summary: SessionSummary) -> dict[str, Any]:
    """A :class:`SessionSummary` as plain JSON-able values."""
    return {f.name: jsonable(getattr(summary, f.name)) for f in dataclasses.fields(summary)}


class GapStream:
    """The gaps of a meter's current fly as a collectable of its own stream.

    bluesky collects one stream per ``collect``; gaps are not samples, so they go to
    ``"<meter>_gaps"`` (see :mod:`smartmeter_ophyd.storage`).  Declare and collect it per
    meter: gap counts differ between meters, so several meters cannot share a gaps stream.
    """

    def __init__(self, meter: SmartMeter) -> None:
        self.meter = meter
        self.parent = None

    @property
    def name(self) -> str:
        return f"{self.meter.name}_gaps"

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        from ..storage import gap_data_keys  # h5py, event_model: on first use

        return gap_data_keys(self.meter.name, self.meter.source_label)

    def get_index(self) -> int:
        assets = self.meter._gap_assets
        return 0 if assets is None else assets.get_index()

    @property
    def pending(self) -> bool:
        """Whether a ``collect`` now would emit documents (a plan may skip it otherwise)."""
        assets = self.meter._gap_assets
        return assets is not None and assets.pending

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        assets = self.meter._gap_assets
        if assets is not None:
            yield from assets.collect_asset_docs(index)


# ------------------------------------------------------------------------- long tables


_NUMPY: Final = {"string": None, "integer": "<i8", "number": "<f8", "boolean": "|b1"}


@dataclasses.dataclass(frozen=True)
class TableColumn:
    """One column of a :class:`TableStream`: its bluesky dtype and units."""

    dtype: str
    """``"string"``, ``"integer"``, ``"number"`` or ``"boolean"``."""
    units: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _NUMPY:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_NUMPY)}")

    def value(self, value: Any) -> Any:
        """``value`` as this column stores it (None is NaN in a number column: not known)."""
        if self.dtype == "number":
            if value is None:
                return math.nan
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{value!r} is not a number")
            return float(value)
        if self.dtype == "integer":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{value!r} is not an integer")
            return int(value)
        if self.dtype == "boolean":
            if not isinstance(value, bool):
                raise TypeError(f"{value!r} is not a boolean")
            return value
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not a string")
        return value


METER: Final = "meter"
"""The column every table has: the meter's name (the row's key, with ``segment``)."""


class TableStream:
    """Collectable: a long table of ``columns``, one row per meter, as one event page.

    Declare it once per run (``declare_stream(table, name=table.name, collect=True)``),
    then per segment: :meth:`add` its rows and ``collect`` it.  A ``collect`` without rows
    added since the last emits nothing.  The descriptor's keys are the column names; every
    column has one value per row.
    """

    def __init__(self, name: str, columns: Mapping[str, TableColumn], source: str) -> None:
        if METER not in columns or columns[METER].dtype != "string":
            raise ValueError(f"table {name!r}: it needs a string column {METER!r}")
        self.name = name
        self.columns = dict(columns)
        self.source = source
        self.parent = None
        self.declared = False
        """Whether the run's stream was declared (the plan sets it; a stream is declared once)."""
        self._rows: list[dict[str, Any]] = []
        self._stamps: list[dict[str, float]] = []

    def add(self, rows: Sequence[Mapping[str, Any]],
            timestamps: Sequence[Mapping[str, float]] | None = None) -> None:
        """Queue ``rows`` (column -> value) for the next ``collect``; ``timestamps`` per row
        and column where a value is older than now (default: now).  A row with a missing,
        extra or mistyped column raises ``ValueError`` naming the meter and the column."""
        now = time.time()
        clean_rows: list[dict[str, Any]] = []
        clean_stamps: list[dict[str, float]] = []
        for i, row in enumerate(rows):
            meter = row.get(METER, f"row {i}")
            if set(row) != set(self.columns):
                missing = sorted(set(self.columns) - set(row))
                extra = sorted(set(row) - set(self.columns))
                raise ValueError(f"{self.name}: {meter}: columns missing {missing}, "
                                 f"unknown {extra}")
            clean: dict[str, Any] = {}
            for key, column in self.columns.items():
                try:
                    clean[key] = column.value(row[key])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{self.name}: {meter}: column {key!r}: {exc}") from None
            stamps = dict(timestamps[i]) if timestamps is not None else {}
            clean_rows.append(clean)
            clean_stamps.append({key: float(stamps.get(key, now)) for key in self.columns})
        self._rows += clean_rows  # all or nothing: a bad row queues none of them
        self._stamps += clean_stamps

    @property
    def pending(self) -> bool:
        """Whether rows wait for a ``collect``."""
        return bool(self._rows)

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        from ._keys import scalar_key

        return {key: scalar_key(f"{self.source}/{key}", column.dtype, _NUMPY[column.dtype],
                                column.units)
                for key, column in self.columns.items()}

    def collect_pages(self) -> Iterator[dict[str, Any]]:
        rows, stamps = self._rows, self._stamps
        if not rows:
            return
        self._rows, self._stamps = [], []
        yield {"data": {key: [row[key] for row in rows] for key in self.columns},
               "timestamps": {key: [s[key] for s in stamps] for key in self.columns},
               "time": [max(s.values()) for s in stamps]}


# ----------------------------------------------------------------------- meter_summary


class RunSummary:
    """One meter's row of the ``meter_summary`` table (``meter.run_summary``): its last
    fly's reconciliation and its read-only state after the fly.

    The state columns (``AFTER_FLY``: the identity, the state, the sample reply and the
    stop summary, each named as the meter's signal without its prefix) record what the fly
    changed.  The writable and sampling settings, which a fly does not change, are in the
    configuration of the meter's own stream.
    """

    FIELDS: Final = {
        "received_samples": TableColumn("integer"),
        "missing_samples": TableColumn("integer"),
        "device_sent_samples": TableColumn("integer"),
        "gaps": TableColumn("integer"),
        "explained": TableColumn("boolean"),
        "start_ts": TableColumn("number", "s"),
        "stop_ts": TableColumn("number", "s"),
        "hdf5_path": TableColumn("string"),
        "summary": TableColumn("string"),
    }
    """The reconciliation: ``device_sent_samples`` is -1 when the meter never said (no
    stop reply), ``start_ts``/``stop_ts`` NaN; ``summary`` is the whole
    :class:`~smartmeter_ophyd.client.SessionSummary` as JSON."""

    AFTER_FLY: Final = {
        "firmware_version": TableColumn("string"),
        "compiled": TableColumn("string"),
        "ip": TableColumn("string"),
        "rtc": TableColumn("boolean"),
        "psram": TableColumn("boolean"),
        "buffer_size": TableColumn("integer"),
        "wifi_ssids": TableColumn("string"),
        "meter_state": TableColumn("string"),
        "sampling_reply": TableColumn("string"),
        "stop_summary": TableColumn("string"),
    }
    """The meter's read-only state after the fly (its signals of these names; JSON text for
    ``wifi_ssids``, ``sampling_reply`` and ``stop_summary``)."""

    def __init__(self, meter: SmartMeter) -> None:
        self.meter = meter

    def row(self) -> tuple[dict[str, Any], dict[str, float]]:
        """``(values, timestamps)``: this meter's row, without ``meter`` and ``segment``;
        the state columns carry their signals' timestamps."""
        summary = self.meter.last_summary
        values: dict[str, Any]
        if summary is None:
            values = {
                "received_samples": 0, "missing_samples": 0, "device_sent_samples": -1,
                "gaps": 0, "explained": False, "start_ts": None, "stop_ts": None,
                "summary": "{}",
            }
        else:
            values = {
                "received_samples": int(summary.received_samples),
                "missing_samples": int(summary.missing_declared),
                "device_sent_samples": (-1 if summary.device_sent_samples is None
                                        else int(summary.device_sent_samples)),
                "gaps": int(summary.gaps + summary.corrupt_frames),
                "explained": bool(summary.explained),
                "start_ts": summary.start_ts,
                "stop_ts": summary.stop_ts,
                "summary": json.dumps(summary_dict(summary)),
            }
        values["hdf5_path"] = str(self.meter.hdf5_path or "")
        stamps: dict[str, float] = {}
        for attr in self.AFTER_FLY:
            reading = getattr(self.meter, attr).read()
            ((value, stamp),) = ((r["value"], r["timestamp"]) for r in reading.values())
            values[attr] = value
            stamps[attr] = float(stamp)
        return values, stamps


class MeterSummary(TableStream):
    """The ``meter_summary`` table: ``meter``, ``segment`` and :class:`RunSummary`'s
    columns, one row per meter each time :meth:`record` is called (once per segment)."""

    def __init__(self, name: str = "meter_summary") -> None:
        super().__init__(name, {METER: TableColumn("string"), "segment": TableColumn("integer"),
                                **RunSummary.FIELDS, **RunSummary.AFTER_FLY},
                         source="smartmeter-ophyd/meter_summary")

    def record(self, meters: Sequence[SmartMeter], segment: int) -> None:
        """Add every meter's row for ``segment`` as its devices hold it now."""
        rows, stamps = [], []
        for meter in meters:
            values, stamp = meter.run_summary.row()
            rows.append({METER: meter.name, "segment": segment, **values})
            stamps.append(stamp)
        self.add(rows, stamps)
