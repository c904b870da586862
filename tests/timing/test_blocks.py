"""``block_phasors`` against its definition, block by block, on irregular time axes."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartmeter_ophyd.timing import _blocks
from smartmeter_ophyd.timing._blocks import block_phasors, cell_runs

ORIGIN = 1_796_000_000.0
BLOCK_S = 0.1
MAINS_HZ = 50.0


def by_definition(time: np.ndarray, voltage: np.ndarray, n_blocks: int) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """(phasor, weight, count) per block: sum w v exp(-i 2 pi f (t - origin)) / sum w, with
    the Hann weight of the sample's place in its block, in float64 throughout."""
    phasor = np.full(n_blocks, np.nan, dtype=complex)
    weight = np.zeros(n_blocks)
    count = np.zeros(n_blocks, dtype=np.int64)
    rel = time - ORIGIN
    for b in range(n_blocks):
        inside = (rel >= b * BLOCK_S) & (rel < (b + 1) * BLOCK_S)
        if not inside.any():
            continue
        w = np.sin(math.pi * (rel[inside] / BLOCK_S - b)) ** 2
        z = np.sum(w * voltage[inside] * np.exp(-2j * math.pi * MAINS_HZ * rel[inside]))
        weight[b], count[b], phasor[b] = w.sum(), inside.sum(), z / w.sum()
    return phasor, weight, count


@pytest.mark.parametrize("chunk", [1 << 20, 997])  # blocks split across passes too
def test_block_sums_follow_the_definition(chunk: int) -> None:
    rng = np.random.default_rng(7)
    spacing = 1.0 / 8000
    time = ORIGIN + 0.0123 + np.cumsum(rng.uniform(0.5, 1.5, 9000) * spacing)
    time = np.delete(time, np.arange(3000, 3900))  # a hole over whole blocks
    voltage = (325 * np.sin(2 * math.pi * MAINS_HZ * (time - ORIGIN) + 0.4)
               + rng.normal(0, 2, time.size)).astype(np.float32)
    n_blocks = 14
    with mock.patch.object(_blocks, "CHUNK", chunk):
        got = block_phasors(time, voltage, origin=ORIGIN, block_s=BLOCK_S, n_blocks=n_blocks,
                            mains_hz=MAINS_HZ, spacing=spacing)
    phasor, weight, count = by_definition(time, voltage.astype(np.float64), n_blocks)
    np.testing.assert_array_equal(got.count, count)
    filled = count > 0
    np.testing.assert_allclose(got.weight, weight, rtol=1e-6)
    # float32 sines (the module's "Limits"): ~1e-7 of the amplitude
    np.testing.assert_allclose(got.phasor[filled], phasor[filled], rtol=0, atol=325 * 1e-6)
    assert np.isnan(got.phasor[~filled]).all()
    hole = (int((time[2999] - ORIGIN) / BLOCK_S), int((time[3000] - ORIGIN) / BLOCK_S))
    assert not got.valid[hole[0]:hole[1] + 1].any()
    assert got.valid[1:hole[0]].all()


@given(
    st.lists(st.one_of(st.integers(-3, 12).map(float),  # exactly on cell edges
                       st.floats(-3.0, 12.0, allow_nan=False)), max_size=60),
    st.integers(1, 10),
)
def test_cell_runs_are_the_runs_of_each_samples_cell(values: list[float], n_cells: int) -> None:
    """Bisection per cell gives what a pass over the samples gives: the samples inside
    ``0 .. n_cells`` and the runs of ``floor(position)`` among them, empty cells skipped."""
    position = np.sort(np.array(values, dtype=np.float64))
    inside, starts, cells, lengths = cell_runs(position, n_cells)
    cell = np.floor(position)
    mask = (cell >= 0) & (cell < n_cells)
    np.testing.assert_array_equal(np.arange(position.size)[inside], np.flatnonzero(mask))
    index = cell[mask].astype(np.int64)  # each sample's cell, in one pass
    want_starts = np.flatnonzero(np.diff(index, prepend=-1))
    want_cells = index[want_starts]
    want_lengths = np.diff(want_starts, append=index.size)
    np.testing.assert_array_equal(starts, want_starts)
    np.testing.assert_array_equal(cells, want_cells)
    np.testing.assert_array_equal(lengths, want_lengths)
