"""Abort, pause and a failing meter in the middle of ``synchronized_fly``.

Whatever ends the run, every meter must be left idle (the emulator's ground truth: no
active session), what the meters sent before must be in the catalog, and the next fly
must start at once.
"""

from __future__ import annotations

import threading
import time

import pytest
from bluesky.utils import RunEngineInterrupted

import plans
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


def test_an_immediate_pause_fails_the_fly_cleanly(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    thread = when_sampling(engine, lambda: engine.RE.request_pause(defer=False))
    # bluesky reports any pause request as RunEngineInterrupted; the run itself is over
    with pytest.raises(RunEngineInterrupted):
        engine.RE(plans.synchronized_fly(meters, 30.0))
    thread.join(10)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] != "success" and "cannot resume mid-run" in stop["reason"]
    assert "cannot pause" in stop["reason"]
    assert_idle(fleet)
    assert_everything_received_is_recorded(embedded_catalog.client[stop["run_start"]], meters)
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
