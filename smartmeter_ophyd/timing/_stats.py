"""Small statistics helpers (numpy only: the package does not depend on scipy)."""

from __future__ import annotations

import math
from typing import Final

import numpy as np

__all__ = ["COVERAGE_Z", "row_nanmedian", "student_t_99"]

COVERAGE_Z: Final = 2.5758293035489
"""Two-sided 99 % quantile of the standard normal distribution."""

# Two-sided 99 % (upper 0.995) quantiles of Student's t for 1..30 degrees of freedom.
_T_TABLE: Final = np.array([
    63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169,
    3.106, 3.055, 3.012, 2.977, 2.947, 2.921, 2.898, 2.878, 2.861, 2.845,
    2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763, 2.756, 2.750,
])


def student_t_99(dof: np.ndarray) -> np.ndarray:
    """Upper 0.995 quantile of Student's t for integer ``dof`` (inf where ``dof`` < 1).

    Tabulated up to 30 degrees of freedom; above, the Cornish-Fisher expansion to second
    order (within 1e-3 of the exact value at 31 and converging to the normal quantile).
    """
    nu = np.asarray(dof, dtype=np.float64)
    z = COVERAGE_Z
    with np.errstate(divide="ignore", invalid="ignore"):
        series = (z + (z**3 + z) / (4 * nu)
                  + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu * nu))
    index = np.clip(nu, 1, 30).astype(np.int64) - 1
    out = np.where(nu > 30, series, _T_TABLE[index])
    return np.where(nu >= 1, out, math.inf)


def row_nanmedian(values: np.ndarray) -> np.ndarray:
    """``np.nanmedian(values, axis=1)`` of a 2-D array, NaN for a row without finite values,
    without the warning.  The same numbers, by sorting each row once (NaN sorts last):
    NumPy's ``nanmedian`` goes through masked arrays for small arrays, ~7x slower."""
    ordered = np.sort(values, axis=1)
    finite = np.count_nonzero(np.isfinite(values), axis=1)
    out = np.full(values.shape[0], np.nan)
    rows = np.flatnonzero(finite)
    n = finite[rows]
    out[rows] = (ordered[rows, (n - 1) // 2] + ordered[rows, n // 2]) / 2
    return out
