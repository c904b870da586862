"""ophyd devices: :class:`SmartMeter` (readings, settings, fly scans into HDF5 + catalog).

* :class:`SmartMeter` - one meter; ``bluesky.protocols`` implemented directly (Readable,
  Triggerable, Configurable, Stageable, Preparable, Flyable, Collectable, WritesStreamAssets);
  flies over TCP, UDP or, with ``transport="MQTT"``, through the meter's MQTT broker.
* :class:`FlyConfig` - what ``prepare`` takes (also as a plain mapping).
* :class:`ProgressStatus` - the ``complete()`` status; feeds ``ProgressBarManager``.
* :class:`CtsPolicy` / :class:`FlowStats` - back-pressure of ``flow_control="cts"`` flies.
* :class:`MeterNtp` - ``meter.ntp``: trigger the meter's NTP sync, read its confidence.
* :class:`HostClock` - the host clock's offset from a time server (SNTP).
* :class:`TableStream` / :class:`MeterSummary` - the run's long tables (one row per meter).
* :class:`MeterMqttStatus` - a meter's 5 s MQTT status as signals (§8.2).

Import cost: what constructing a :class:`SmartMeter` needs is imported here (ophyd, the
client, the codec); h5py, event_model, the time model and the alignment (numpy-heavy) load
with the first fly or on first use of their names, MQTT (aiomqtt) with the first MQTT fly or
``MeterMqttStatus``.  ``tests/test_packaging.py`` keeps it so.
"""

from typing import TYPE_CHECKING

from ._controller import FlyError
from ._flow import CtsPolicy, FlowStats
from ._fly import FLOW_CONTROL_MODES, FlyConfig, ProgressStatus
from ._hostclock import ClockMeasurement, HostClock, HostClockError
from ._live import LiveSummary
from ._ntp import MeterNtp, NtpSyncError
from ._records import (
    GapStream,
    MeterSummary,
    RunSummary,
    TableColumn,
    TableStream,
    summary_dict,
)
from ._smartmeter import SmartMeter
from ._timing import TimingStream

__all__ = [
    "AlignmentStream",
    "FLOW_CONTROL_MODES",
    "ClockMeasurement",
    "CtsPolicy",
    "FlowStats",
    "FlyConfig",
    "FlyError",
    "GapStream",
    "HostClock",
    "LiveSummary",
    "HostClockError",
    "MeterMqttStatus",
    "MeterSummary",
    "MeterNtp",
    "NtpSyncError",
    "ProgressStatus",
    "RunSummary",
    "SmartMeter",
    "TableColumn",
    "TableStream",
    "TimingStream",
    "summary_dict",
]

if TYPE_CHECKING:  # imported on first use at run time, see __getattr__
    from ._alignment import AlignmentStream
    from ._mqtt import MeterMqttStatus

_LAZY = {"AlignmentStream": "._alignment", "MeterMqttStatus": "._mqtt"}
"""Names whose modules load h5py/numpy analysis code or aiomqtt: imported on first use."""


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

