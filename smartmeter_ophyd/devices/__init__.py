"""ophyd devices: :class:`SmartMeter` (readings, settings, fly scans into HDF5 + catalog).

* :class:`SmartMeter` - one meter; ``bluesky.protocols`` implemented directly (Readable,
  Triggerable, Configurable, Stageable, Preparable, Flyable, Collectable, WritesStreamAssets).
* :class:`FlyConfig` - what ``prepare`` takes (also as a plain mapping).
* :class:`ProgressStatus` - the ``complete()`` status; feeds ``ProgressBarManager``.
* :class:`CtsPolicy` / :class:`FlowStats` - back-pressure of ``flow_control="cts"`` flies.
"""

from ._flow import CtsPolicy, FlowStats
from ._fly import FLOW_CONTROL_MODES, FlyConfig, ProgressStatus
from ._smartmeter import FlyError, GapStream, RunSummary, SmartMeter, summary_dict

__all__ = [
    "FLOW_CONTROL_MODES",
    "CtsPolicy",
    "FlowStats",
    "FlyConfig",
    "FlyError",
    "GapStream",
    "ProgressStatus",
    "RunSummary",
    "SmartMeter",
    "summary_dict",
]
