"""The time model against a sample-level reference of the firmware whose truth we know."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartmeter_ophyd.timing import DeclaredGap, SessionRecords, TimeModelError, _model, model_times
from smartmeter_ophyd.timing._model import _Lattice, _row_times, _sample_times, _Structure

from ._firmware import T0, Firmware, Result, Sync

CONFIDENCE_MS = 0.3


def syncs(every_s: float = 60.0, count: int = 4, *, blocking: bool, seed: int = 0) -> list[Sync]:
    """Syncs at random phases of the second, each leaving the clock up to 0.2 ms off."""
    rng = np.random.default_rng(seed)
    return [Sync(at=every_s * k + rng.uniform(0.0, 1.0), error_s=rng.uniform(-2e-4, 2e-4),
                 confidence_ms=CONFIDENCE_MS, sets_rtc=blocking) for k in range(1, count + 1)]


def errors(result: Result, **extra: object) -> tuple[np.ndarray, object]:
    model = model_times(result.records(**extra))
    return model.times - (T0 + result.true_rel), model


def nominal_error(result: Result) -> float:
    nominal = result.start_ts + np.arange(result.true_rel.size) / result.fw.rate
    return float(np.max(np.abs(nominal - (T0 + result.true_rel))))


@pytest.mark.parametrize(("ade_ppm", "rtc_ppm"), [(50.0, 20.0), (-50.0, 20.0), (50.0, -20.0)])
def test_8khz_with_background_syncs_stays_within_confidence(ade_ppm: float, rtc_ppm: float) -> None:
    """Drifting ADE and RTC, bg syncs (no RTC restart): every sample, first and last
    minute included, within the confidence + 1 ms; the nominal model is far off."""
    fw = Firmware(rate=8000, duration_s=200, ade_ppm=ade_ppm, rtc_ppm=rtc_ppm,
                  syncs=syncs(45.0, 4, blocking=False, seed=1))
    result = fw.run()
    err, model = errors(result)
    assert np.max(np.abs(err)) <= (CONFIDENCE_MS + 1.0) * 1e-3
    assert nominal_error(result) > 3e-3
    # Four ms-resolution stamps over three minutes pin the rate to a few ppm only.
    assert model.rate_fitted and model.rtc_ppm == pytest.approx(rtc_ppm, abs=8.0)
    assert model.ambiguous.size == 0
    assert np.all(np.abs(model.residuals_s) < 1.5e-3)


def test_blocking_syncs_restart_the_rtc_and_the_model_follows() -> None:
    """A main-core sync rewrites the RTC: the second in progress is cut or stretched (a
    silent jump of up to 0.5 s).  Outside the few flagged samples next to a jump every
    sample stays within the confidence + 1 ms; the nominal model is off by the jumps."""
    fw = Firmware(rate=8000, duration_s=200, ade_ppm=50.0, rtc_ppm=-20.0,
                  syncs=syncs(45.0, 4, blocking=True, seed=2))
    result = fw.run()
    err, model = errors(result)
    fine = np.ones(err.size, dtype=bool)
    fine[model.ambiguous] = False
    assert model.ambiguous.size <= 4 * len(fw.syncs)
    assert np.max(np.abs(err[fine])) <= (CONFIDENCE_MS + 1.0) * 1e-3
    assert nominal_error(result) > 0.1
    # The restarts (and the count lost in stretched seconds) made the firmware correct.
    assert any(s.correction for s in result.syncs)


def test_correction_duplicates_repeat_their_original_time() -> None:
    fw = Firmware(rate=4000, duration_s=150, syncs=syncs(30.0, 4, blocking=True, seed=3))
    result = fw.run()
    duplicates = np.flatnonzero(result.kind == 1)
    assert duplicates.size > 0
    err, model = errors(result)
    assert np.all(model.times[duplicates] == model.times[duplicates - 1])
    fine = np.ones(err.size, dtype=bool)
    fine[model.ambiguous] = False
    assert np.max(np.abs(err[fine])) <= (CONFIDENCE_MS + 1.0) * 1e-3


def test_bursty_rate_10_is_placed_within_half_a_lattice_step() -> None:
    """Rate 10: bursts of 10 samples 4 ms apart at each RTC second (§4.3).  The lattice's
    phase at the edge is not in any record: placement within half a step (2 ms)."""
    fw = Firmware(rate=10, duration_s=300, ade_ppm=50.0, rtc_ppm=2.0,
                  syncs=syncs(60.0, 4, blocking=True, seed=4))
    result = fw.run()
    err, model = errors(result)
    assert model.placement_s == pytest.approx(2e-3)
    assert model.ambiguous.size == 0
    assert np.max(np.abs(err)) <= model.placement_s + (CONFIDENCE_MS + 1.0) * 1e-3
    # Bursts: ten rows 4 ms apart, the next burst at the first RTC edge, 0.5 s on (§4.10).
    assert np.allclose(np.diff(model.times[:10]), 0.004, atol=1e-6)  # float64 unix time
    assert model.times[10] - model.times[0] == pytest.approx(0.5 + 0.002, abs=1e-4)


def test_latched_rate_readings_on_the_rtc_second() -> None:
    fw = Firmware(rate=50, duration_s=200, latched=True, rtc_ppm=2.0,
                  syncs=syncs(45.0, 4, blocking=True, seed=5))
    result = fw.run()
    err, model = errors(result)
    assert model.placement_s == 0.0
    fine = np.ones(err.size, dtype=bool)
    fine[model.ambiguous] = False
    assert np.max(np.abs(err[fine])) <= (CONFIDENCE_MS + 1.0) * 1e-3


def test_declared_gaps_keep_later_samples_in_place() -> None:
    fw = Firmware(rate=8000, duration_s=100, syncs=syncs(30.0, 3, blocking=False, seed=6))
    result = fw.run()
    full = model_times(result.records()).times
    keep = np.ones(result.true_rel.size, dtype=bool)
    keep[100_000:100_504] = False  # one lost frame of 504 samples...
    keep[400_000:412_000] = False  # ...and a longer loss
    gaps = (DeclaredGap(index=100_000, missing=504), DeclaredGap(index=400_000 - 504,
                                                                 missing=12_000))
    model = model_times(result.records(gaps=gaps, received=int(keep.sum())))
    assert np.array_equal(model.times, full[keep])
    # One gap of unknown size is inferred from the stop reply's sent_samples.
    unknown = (gaps[0], dataclasses.replace(gaps[1], missing=-1))
    inferred = model_times(result.records(gaps=unknown, received=int(keep.sum())))
    assert np.array_equal(inferred.times, full[keep])
    assert any("inferred" in n for n in inferred.notes)
    both = tuple(dataclasses.replace(g, missing=-1) for g in gaps)
    with pytest.raises(TimeModelError, match="'m'.*2 gaps of unknown size"):
        model_times(result.records(gaps=both, received=int(keep.sum())))


def test_without_records_the_rate_is_nominal_and_said_so() -> None:
    fw = Firmware(rate=1000, duration_s=30, rtc_ppm=0.0)
    result = fw.run()
    err, model = errors(result)
    assert not model.rate_fitted and model.rtc_ppm == 0.0
    assert any("not fitted" in n for n in model.notes)
    assert np.max(np.abs(err)) <= model.placement_s + 1e-3


def test_each_interval_structure_is_built_once() -> None:
    """The structure depends on the first second's trial and the rows the records reached;
    the fixed-point passes and the trials repeat those inputs, and without records the
    trials cannot differ (the priors alone score zero): one build per distinct input."""
    quiet = Firmware(rate=8000, duration_s=10).run().records()
    with mock.patch.object(_model, "_build", wraps=_model._build) as build:
        model_times(quiet)
    assert build.call_count == 1
    synced = Firmware(rate=8000, duration_s=100,
                      syncs=syncs(30.0, 3, blocking=False, seed=6)).run().records()
    with mock.patch.object(_model, "_build", wraps=_model._build) as build:
        model_times(synced)
    inputs = {(c.args[7] if len(c.args) > 7 else c.kwargs.get("head_adjust", 0),
               c.args[4].tobytes()) for c in build.call_args_list}
    assert build.call_count == len(inputs) < 9


def test_without_rtc_times_are_nominal_and_said_so() -> None:
    records = SessionRecords(meter="x", rate=8000, start_ts=T0, received=8000, rtc=False)
    model = model_times(records)
    assert np.allclose(model.times - T0, np.arange(8000) / 8000, atol=1e-6)
    assert any("no RTC" in n for n in model.notes)


def test_bad_records_name_the_meter() -> None:
    fw = Firmware(rate=1000, duration_s=5, syncs=[Sync(at=2.3, sets_rtc=False),
                                                   Sync(at=4.1, sets_rtc=False)])
    records = fw.run().records(name="meter-7")
    with pytest.raises(TimeModelError, match="'meter-7'.*start_ts 0.0.*no absolute time"):
        model_times(dataclasses.replace(records, start_ts=0.0))
    early = dataclasses.replace(records.syncs[0], to_ts=records.start_ts - 1)
    with pytest.raises(TimeModelError, match="'meter-7'.*sync record 0 has To"):
        model_times(dataclasses.replace(records, syncs=(early, records.syncs[1])))
    fewer = dataclasses.replace(records.syncs[1], total=1)
    with pytest.raises(TimeModelError, match="'meter-7'.*sync record 1 counts 1 samples"):
        model_times(dataclasses.replace(records, syncs=(records.syncs[0], fewer)))
    with pytest.raises(TimeModelError, match="'meter-7'.*rate 1234 Hz does not divide 32000"):
        model_times(dataclasses.replace(records, rate=1234))
    with pytest.raises(TimeModelError, match="'meter-7'.*above the 50 Hz limit"):
        model_times(dataclasses.replace(records, latched=True))
    with pytest.raises(TimeModelError, match="'meter-7'.*gap at sample 99999 lies outside"):
        model_times(dataclasses.replace(records, gaps=(DeclaredGap(99_999, 3),)))


@st.composite
def structures(draw: st.DrawFn) -> tuple[_Structure, np.ndarray]:
    """A random interval structure (empty intervals, fillers, slot events included) and
    ascending stream positions, some before the first interval and past the last."""
    m = draw(st.integers(1, 8))
    rows = draw(st.lists(st.integers(0, 40), min_size=m, max_size=m))
    fillers = [draw(st.integers(0, min(4, r))) for r in rows]
    origin = draw(st.integers(0, 5))
    starts = np.concatenate(([origin], origin + np.cumsum(rows))).astype(np.int64)
    total = int(starts[-1])
    events = sorted(draw(st.lists(st.integers(0, total + 5), max_size=6)))
    deltas = [draw(st.sampled_from((-1, 1, 2))) for _ in events]
    bounds = T0 + np.cumsum(np.concatenate(([0.0], draw(st.lists(
        st.floats(0.5, 1.5), min_size=m, max_size=m)))))
    structure = _Structure(
        bounds=bounds, segment=np.zeros(m, np.int64), u=np.arange(m, dtype=np.float64),
        phase=np.array(draw(st.lists(st.floats(0.0, 1e-3), min_size=m, max_size=m))),
        starts=starts, fillers=np.array(fillers, dtype=np.int64),
        event_row=np.array(events, dtype=np.int64), event_delta=np.array(deltas, np.int64),
    )
    chosen = draw(st.lists(st.integers(0, total + 10), max_size=80, unique=True))
    return structure, np.array(sorted(chosen), dtype=np.int64)


@given(structures(), st.integers(1, 7))
def test_sample_times_equal_row_times_bit_for_bit(case: tuple[_Structure, np.ndarray],
                                                   chunk: int) -> None:
    structure, positions = case
    lattice = _Lattice(rate=8000, step_s=1.25e-4, head_phase_s=0.0, edge_phase_s=0.0,
                       placement_s=0.0)
    expected = _row_times(structure, lattice, positions)[0]
    with mock.patch.object(_model, "_CHUNK", chunk):  # runs split across passes
        got = _sample_times(structure, lattice, positions)
    np.testing.assert_array_equal(got, expected)
