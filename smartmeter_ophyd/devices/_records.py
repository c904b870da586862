"""Small collectables and readables a fly adds to its run besides the samples.

* :class:`GapStream` - the gaps of a meter's current fly as its ``<meter>_gaps`` stream.
* :class:`RunSummary` - the fly's reconciliation, read once after it (``meter_summary``).
* :func:`summary_dict` - a :class:`~smartmeter_ophyd.client.SessionSummary` as JSON values.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from ophyd.status import Status

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


class RunSummary:
    """Readable: the last fly's reconciliation, read once after ``complete`` (``meter_summary``).

    Its configuration is the meter's read-only state *after* the fly (``AFTER_FLY``: the
    identity, the state, the sample reply and the stop summary), so the stream's descriptor
    records what the fly changed.  The writable and sampling settings, which a fly does not
    change, are in the configuration of the meter's own stream; repeating them here made the
    ``meter_summary`` descriptor of 50 meters 1100 configuration keys, whose validation was
    a large part of the end of such a run.
    """

    AFTER_FLY: Final = ("firmware_version", "compiled", "ip", "rtc", "psram", "buffer_size",
                        "wifi_ssids", "meter_state", "sampling_reply", "stop_summary")

    FIELDS: Final = {
        "received_samples": ("integer", "<i8"),
        "missing_samples": ("integer", "<i8"),
        "device_sent_samples": ("integer", "<i8"),
        "gaps": ("integer", "<i8"),
        "explained": ("boolean", "|b1"),
        "start_ts": ("number", "<f8"),
        "stop_ts": ("number", "<f8"),
        "hdf5_path": ("string", "<U0"),
        "summary": ("string", "<U0"),
    }

    def __init__(self, meter: SmartMeter) -> None:
        self.meter = meter
        self.parent = None

    @property
    def name(self) -> str:
        return f"{self.meter.name}_run"

    def _key(self, field: str) -> str:
        return f"{self.meter.name}_run_{field}"

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for field, (dtype, dtype_numpy) in self.FIELDS.items():
            key: dict[str, Any] = {"source": f"{self.meter.source_label}/{field}", "dtype": dtype,
                                   "shape": []}
            if dtype != "string":
                key["dtype_numpy"] = dtype_numpy
            if field in ("start_ts", "stop_ts"):
                key["units"] = "s"
            out[self._key(field)] = key
        return out

    def read(self) -> dict[str, dict[str, Any]]:
        summary = self.meter.last_summary
        path = self.meter.hdf5_path or ""
        now = time.time()

        def opt_int(v: int | None) -> int:
            return -1 if v is None else int(v)

        def opt_float(v: float | None) -> float:
            return math.nan if v is None else float(v)

        if summary is None:
            values: dict[str, Any] = {
                "received_samples": 0, "missing_samples": 0, "device_sent_samples": -1,
                "gaps": 0, "explained": False, "start_ts": math.nan, "stop_ts": math.nan,
                "hdf5_path": path, "summary": "{}",
            }
        else:
            values = {
                "received_samples": summary.received_samples,
                "missing_samples": summary.missing_declared,
                "device_sent_samples": opt_int(summary.device_sent_samples),
                "gaps": summary.gaps + summary.corrupt_frames,
                "explained": bool(summary.explained),
                "start_ts": opt_float(summary.start_ts),
                "stop_ts": opt_float(summary.stop_ts),
                "hdf5_path": path,
                "summary": json.dumps(summary_dict(summary)),
            }
        return {self._key(k): {"value": v, "timestamp": now} for k, v in values.items()}

    def trigger(self) -> Status:
        status = Status()
        status.set_finished()
        return status

    def describe_configuration(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for attr in self.AFTER_FLY:
            out.update(getattr(self.meter, attr).describe())
        return out

    def read_configuration(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for attr in self.AFTER_FLY:
            out.update(getattr(self.meter, attr).read())
        return out
