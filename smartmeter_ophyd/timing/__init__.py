"""Times you can verify: post-hoc waveform alignment and the per-sample time model.

Pure numpy, no I/O, no clocks: every function maps arrays and records to arrays.

* ``align`` / ``align_pair`` estimate, per window, the residual time offset between meters
  on the same phase from their recorded voltage waveforms (with an uncertainty and a
  correlation quality); ``apply_alignment`` maps a meter's time axis onto the reference's.
* ``model_times`` builds each stored sample's absolute time from the meter's own records
  (``SessionRecords``: ``start_ts``, ``SyncRecord``s, ``DeclaredGap``s, the stop reply),
  following how firmware 2.2 stores samples per RTC second (§4.3, §4.10, §6.5).

See ``docs/explanations/timing-model.md`` for what each figure means and what limits it.
"""

from ._alignment import (
    Aligner,
    Alignment,
    AlignmentError,
    Waveform,
    align,
    align_pair,
    alignment_from_table,
    apply_alignment,
)
from ._model import (
    DeclaredGap,
    ModelledTimes,
    SessionRecords,
    SyncRecord,
    TimeModelError,
    model_times,
)

__all__ = [
    "Aligner",
    "Alignment",
    "AlignmentError",
    "DeclaredGap",
    "ModelledTimes",
    "SessionRecords",
    "SyncRecord",
    "TimeModelError",
    "Waveform",
    "align",
    "align_pair",
    "alignment_from_table",
    "apply_alignment",
    "model_times",
]
