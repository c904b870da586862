"""Locating a time window over HTTP: few requests when interpolation is right, exact otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from smartmeter_ophyd.storage._readback import _LOCATE_MARGIN, _locate_over_http

RATE = 8000


def _times(gap_at: int, gap_samples: int, n: int) -> np.ndarray:
    positions = np.arange(n, dtype=np.int64)
    positions[gap_at:] += gap_samples
    return 1_700_000_000.0 + positions / RATE


class CountingReader:
    def __init__(self, values: np.ndarray) -> None:
        self.values, self.calls = values, 0

    def __call__(self, a: int, b: int) -> np.ndarray:
        self.calls += 1
        return self.values[max(0, a) : b]


@pytest.mark.parametrize(
    ("gap_samples", "max_calls"),
    [(0, 3), (100, 3), (5 * _LOCATE_MARGIN, 40)],  # the last one defeats interpolation
)
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_locate_matches_numpy(gap_samples: int, max_calls: int, where: float) -> None:
    n = 2_000_000
    times = _times(n // 3, gap_samples, n)
    t0 = float(times[int(n * where)]) + 0.3 / RATE
    t1 = t0 + 20.0
    reader = CountingReader(times)
    i0, i1, got = _locate_over_http(reader, n, t0, t1)
    assert (i0, i1) == (np.searchsorted(times, t0), np.searchsorted(times, t1))
    assert np.array_equal(got, times[i0:i1])
    assert reader.calls <= max_calls


def test_locate_outside_and_unbounded() -> None:
    times = _times(10, 50, 1000)
    for t0, t1 in (
        (times[0] - 5, times[0] - 1),
        (times[-1] + 1, times[-1] + 2),
        (-np.inf, np.inf),
        (times[5], times[5]),
    ):
        i0, i1, got = _locate_over_http(CountingReader(times), len(times), t0, t1)
        assert (i0, i1) == (np.searchsorted(times, t0), np.searchsorted(times, t1))
        assert np.array_equal(got, times[i0:i1])
    assert _locate_over_http(CountingReader(times[:0]), 0, 0.0, 1.0)[:2] == (0, 0)
