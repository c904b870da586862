"""The statistics helpers against NumPy's own functions."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from smartmeter_ophyd.timing._stats import row_nanmedian

values = st.one_of(st.just(np.nan), st.floats(-1e3, 1e3, allow_nan=False),
                   st.floats(-1e-6, 1e-6, allow_nan=False))


@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 9)), elements=values))
def test_row_nanmedian_is_numpys_nanmedian_bit_for_bit(table: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        want = np.nanmedian(table, axis=1)
    np.testing.assert_array_equal(row_nanmedian(table), want)
