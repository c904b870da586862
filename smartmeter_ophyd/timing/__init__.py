"""Times you can verify: post-hoc waveform alignment and the per-sample time model.

Pure numpy, no I/O, no clocks: every function maps arrays and records to arrays.

* ``align`` / ``align_pair`` estimate, per window, the residual time offset between meters
  on the same phase from their recorded voltage waveforms (with an uncertainty and a
  correlation quality); ``apply_alignment`` maps a meter's time axis onto the reference's.

See ``docs/explanations/timing-model.md`` for what each figure means and what limits it.
"""

from ._alignment import (
    Alignment,
    AlignmentError,
    Waveform,
    align,
    align_pair,
    apply_alignment,
)

__all__ = [
    "Alignment",
    "AlignmentError",
    "Waveform",
    "align",
    "align_pair",
    "apply_alignment",
]
