"""``period_misfit`` against its definition, period by period."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest

from smartmeter_ophyd.timing import _blocks
from smartmeter_ophyd.timing._misfit import Reference, period_misfit

ORIGIN = 1_796_000_000.0
MAINS_HZ = 50.0
PERIOD_S = 1.0 / MAINS_HZ


def wave(time: np.ndarray) -> np.ndarray:
    return (325 * np.sin(2 * math.pi * MAINS_HZ * (time - ORIGIN))).astype(np.float32)


def by_definition(time: np.ndarray, voltage: np.ndarray, ref: Reference, knots: np.ndarray,
                  offsets: np.ndarray, gain: float, n_periods: int) -> np.ndarray:
    """Mean of (v - gain * ref(t - d(t)))^2 over each period, sample by sample, in seconds
    from the origin (unix times in float64 resolve only 0.24 us: 0.02 V on this wave)."""
    out = np.full(n_periods, np.nan)
    rel, ref_rel = time - ORIGIN, ref.time - ORIGIN
    for p in range(n_periods):
        inside = (rel >= p * PERIOD_S) & (rel < (p + 1) * PERIOD_S)
        squares = []
        for r, t, v in zip(rel[inside], time[inside], voltage[inside].astype(np.float64),
                           strict=True):
            at = r - float(np.interp(t, knots, offsets))
            if ref_rel[0] <= at <= ref_rel[-1]:
                squares.append((v - gain * float(np.interp(at, ref_rel, ref.voltage))) ** 2)
        if len(squares) >= 4:
            out[p] = np.mean(squares)
    return out


@pytest.mark.parametrize("chunk", [1 << 20, 333])  # periods split across passes too
def test_period_means_follow_the_definition(chunk: int) -> None:
    rng = np.random.default_rng(3)
    ref_time = ORIGIN + 0.001 + np.arange(1800) / 8000
    ref = Reference.of(ref_time, wave(ref_time))
    time = ORIGIN + 0.0004 + np.cumsum(rng.uniform(0.8, 1.2, 1700)) / 8000
    voltage = wave(time - 20e-6) + rng.normal(0, 1, time.size).astype(np.float32)
    knots = np.array([ORIGIN + 0.05, ORIGIN + 0.15])
    offsets = np.array([10e-6, 30e-6])
    n_periods = 12  # the last ones lie past both meters' data
    with mock.patch.object(_blocks, "CHUNK", chunk):
        got = period_misfit(time, voltage, ref, knots=knots, offsets=offsets, gain=1.01,
                            origin=ORIGIN, period_s=PERIOD_S, n_periods=n_periods,
                            gaps=np.zeros((0, 2)))
    expected = by_definition(time, voltage, ref, knots, offsets, 1.01, n_periods)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert np.isnan(got[-1]) and not np.isnan(got[1:9]).any()
