"""Abort, pause and a failing meter in the middle of ``synchronized_fly``.

Whatever ends the run, every meter must be left idle (the emulator's ground truth: no
active session), what the meters sent before must be in the catalog, and the next fly
must start at once.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from bluesky.utils import RunEngineInterrupted

import plans
from plans._fly import _remaining
from smartmeter_ophyd.readback import meter_rows
from smartmeter_ophyd.storage import read_stream


def when_sampling(engine, action) -> threading.Thread:
    """Run ``action()`` on another thread once the plan has sent its ``complete``s."""

    def wait_then_act() -> None:
        deadline = time.monotonic() + 30
        while not engine.commands("complete") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # some samples in
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def assert_idle(fleet) -> None:
    for name in fleet.names:
        assert not fleet.truth(name).active, f"{name} is still sampling"


def assert_everything_received_is_recorded(run, meters) -> None:
    for meter in meters:
        summary = meter.last_summary
        assert summary is not None, meter.name
        ds = read_stream(run, meter.name, prefix=meter.name)
        assert ds.sizes["time"] == summary.received_samples > 0, meter.name


def test_abort_mid_fly_leaves_every_meter_idle_and_the_next_fly_starts_at_once(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    thread = when_sampling(engine, lambda: engine.RE.abort("test abort"))
    with pytest.raises(RunEngineInterrupted):
        engine.RE(plans.synchronized_fly(meters, 30.0))
    thread.join(10)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "abort"
    assert_idle(fleet)
    assert_everything_received_is_recorded(embedded_catalog.client[stop["run_start"]], meters)
    (uid,) = engine.RE(plans.synchronized_fly(meters, 0.5))
    assert engine.docs("stop")[-1]["exit_status"] == "success"
    assert_everything_received_is_recorded(embedded_catalog.client[uid], meters)


def test_a_pause_while_arming_fails_the_fly_cleanly_once_resumed(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)

    def pause_at_kickoff() -> None:  # kickoff waits for the first sample, at T (§6.4)
        deadline = time.monotonic() + 30
        while not engine.commands("kickoff") and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.RE.request_pause(defer=False)

    thread = threading.Thread(target=pause_at_kickoff, daemon=True)
    thread.start()
    with pytest.raises(RunEngineInterrupted):
        engine.RE(plans.synchronized_fly(meters, 5.0))
    thread.join(10)
    assert engine.RE.state == "paused"
    with pytest.raises(plans.FlyInterruptedError, match="re-send `sample`"):
        engine.RE.resume()
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and "being armed or released" in stop["reason"]
    time.sleep(1.5)  # past T: a meter armed for it must not be left sampling (§6.4)
    assert_idle(fleet)
    assert engine.RE.state == "idle"


def test_a_meter_lost_mid_fly_fails_the_run_naming_it_and_keeps_the_others_data(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet, reconnect=False)
    thread = when_sampling(engine, lambda: fleet.inject("plan2", "reboot"))
    with pytest.raises(Exception) as info:
        engine.RE(plans.synchronized_fly(meters, 30.0))
    thread.join(10)
    assert meters[1].meter_label in str(info.value)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail"
    assert meters[1].meter_label in stop["reason"] and "Status" not in stop["reason"]
    assert_idle(fleet)
    run = embedded_catalog.client[stop["run_start"]]
    ds = read_stream(run, "m1", prefix="m1")
    assert ds.sizes["time"] == meters[0].last_summary.received_samples > 0
    assert "meter_summary" in run and "synchronization" in run


def test_after_a_pause_what_remains_is_set_by_the_meter_that_sampled_least() -> None:
    # The pause stops the meters one after another: here m2 stopped 11 ms after m1.
    def meter(name: str, start_ts: float, stop_ts: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, last_summary=SimpleNamespace(
            start_ts=start_ts, stop_ts=stop_ts, received_samples=0, missing_declared=0))

    meters = [meter("m1", 100.0, 100.700), meter("m2", 100.0, 100.711)]
    config = SimpleNamespace(rate=8000, duration_s=2.0)
    setup = SimpleNamespace(meters=meters, configs={"m1": config, "m2": config})
    assert _remaining(setup, None) == pytest.approx(1.3)  # m1 needs 1.3 s more, not 1.289

    lost = SimpleNamespace(name="m2", last_summary=SimpleNamespace(  # no stop reply
        start_ts=None, stop_ts=None, received_samples=4000, missing_declared=800))
    setup.meters = [meters[0], lost]
    assert _remaining(setup, None) == pytest.approx(1.4)  # m2 has 4800 samples = 0.6 s

    done = [meter("m1", 100.0, 102.0), meter("m2", 100.0, 101.99995)]
    setup.meters = done
    assert _remaining(setup, None) == 0.0  # under one sample left: nothing to record


def test_pause_and_resume_records_a_second_synchronized_segment(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    duration = 2.0
    thread = when_sampling(engine, lambda: engine.RE.request_pause(defer=True))
    with pytest.raises(RunEngineInterrupted):
        engine.RE(plans.synchronized_fly(meters, duration))
    thread.join(10)
    assert engine.RE.state == "paused"
    assert_idle(fleet)  # the devices stopped their meters when the RunEngine paused
    first = [m.last_summary for m in meters]
    engine.RE.resume()
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success", stop
    run = embedded_catalog.client[stop["run_start"]]
    sync = meter_rows(run["synchronization"].read())
    assert [row["segment"] for row in sync["m1"]] == [0, 1]
    starts = [row["scheduled_start"] for row in sync["m1"]]
    assert starts[1] > starts[0] and [row["scheduled_start"] for row in sync["m2"]] == starts
    summary = meter_rows(run["meter_summary"].read())  # one row per meter and segment
    assert {m: [row["segment"] for row in rows] for m, rows in summary.items()} == {
        "m1": [0, 1], "m2": [0, 1]}
    for meter, before in zip(meters, first, strict=True):
        after = meter.last_summary
        assert after.start_ts > before.stop_ts  # a new session, after the pause
        assert after.start_ts == pytest.approx(starts[1] - 0.001, abs=0.005)
        ds = read_stream(run, meter.name, prefix=meter.name)
        assert ds.sizes["time"] == before.received_samples + after.received_samples
        done = (before.stop_ts - before.start_ts) + (after.stop_ts - after.start_ts)
        assert done >= duration - 0.01
