"""Link and meter faults in the middle of ``plans.synchronized_fly`` (issue 9, fault matrix).

Each fault is injected into an emulated meter while a RunEngine runs the plan into the
embedded catalog.  Every run must end with received + declared missing == what the meter
sent (the emulator's ground truth, not the stop reply), every meter idle, and the run's
documents (stop reason, ``meter_summary``, the gaps stream) saying what happened.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import plans

from ._support import assert_accounted, assert_idle, when_sampling


def fly(engine: Any, meters: list[Any], duration: float, **kwargs: Any):
    """Run the plan; returns (uids, error, seconds)."""
    started = time.monotonic()
    try:
        uids = engine.RE(plans.synchronized_fly(meters, duration, **kwargs))
        error = None
    except Exception as exc:  # the run failed: its stop document says why
        uids, error = (), exc
    return uids, error, time.monotonic() - started


def the_run(engine: Any, catalog: Any) -> tuple[dict[str, Any], Any]:
    (stop,) = engine.docs("stop")
    return stop, catalog.client[stop["run_start"]]


# ------------------------------------------------------------------ faults a run survives

@pytest.mark.parametrize("fault, args, declared", [
    # garbage right before a frame: the frame ahead of it no longer ends where a frame or
    # line starts, so the decoder declares that one frame missing (42 samples) and resyncs
    ("garbage", {"hex": "00ff13" * 40}, 42),
    ("log_in_frame", {"text": "WiFi: reconnecting"}, 0),  # cut out of the frame (§4.6)
    ("stall", {"seconds": 4.0}, 0),  # longer than the device's 3 s silence timeout
])
def test_a_fault_the_stream_survives_loses_nothing_and_the_run_succeeds(
    fleet_factory, smartmeters, engine, embedded_catalog, fault, args, declared
) -> None:
    fleet = fleet_factory(1)
    (meter,) = smartmeters(fleet)
    thread = when_sampling(engine, lambda: fleet.inject(0, fault, **args))
    _, error, took = fly(engine, [meter], 2.0)
    thread.join(10)
    assert error is None, error
    stop, run = the_run(engine, embedded_catalog)
    assert stop["exit_status"] == "success"
    assert_idle(fleet)
    summary = assert_accounted(run, meter, fleet.truth(0).sent_samples)
    assert summary["missing_samples"] == declared and summary["explained"]
    if declared:
        gaps = run["m1_gaps"].read()
        assert gaps.sizes["time"] >= 1  # where the declared samples are missing
    assert took < 20


def test_lost_udp_datagrams_are_declared_missing_and_reconciled(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(1)
    (meter,) = smartmeters(fleet)
    thread = when_sampling(engine, lambda: fleet.inject(0, "drop_udp", count=5))
    _, error, took = fly(engine, [meter], 2.0, transport="UDP")
    thread.join(10)
    assert error is None, error
    stop, run = the_run(engine, embedded_catalog)
    assert stop["exit_status"] == "success"
    assert_idle(fleet)
    summary = assert_accounted(run, meter, fleet.truth(0).sent_samples)
    assert summary["missing_samples"] > 0 and summary["explained"]
    assert run["m1_gaps"].read().sizes["time"] >= 1


# ------------------------------------------------------------------ faults that end the run

def overflowing_fleet(fleet_factory) -> tuple[Any, dict[str, Any]]:
    # a ring buffer of 2000 samples (0.25 s at 8 kHz x 24 B) overflows in a 1 s stall (§4.10)
    return fleet_factory(1, ring_buffer_bytes=24 * 2000), {"fault": "stall", "seconds": 1.0}


@pytest.mark.parametrize("case, cause", [
    ("drop_connections", "connection lost"),
    ("reboot", "connection lost"),
    ("overflow", "ring-buffer overflow"),
])
def test_a_meter_lost_mid_run_fails_it_naming_the_meter_and_keeps_every_sample_sent(
    fleet_factory, smartmeters, engine, embedded_catalog, case, cause
) -> None:
    if case == "overflow":
        fleet, args = overflowing_fleet(fleet_factory)
    else:
        fleet, args = fleet_factory(1), {"fault": case}
    (meter,) = smartmeters(fleet, reconnect=False)
    thread = when_sampling(engine, lambda: fleet.inject(0, **args))
    _, error, took = fly(engine, [meter], 3.0)
    thread.join(10)
    assert error is not None and meter.meter_label in str(error) and cause in str(error)
    stop, run = the_run(engine, embedded_catalog)
    assert stop["exit_status"] == "fail"
    assert meter.meter_label in stop["reason"] and cause in stop["reason"]
    assert_idle(fleet)
    truth = fleet.truth(0)
    summary = assert_accounted(run, meter, truth.sent_samples)
    assert summary["received_samples"] > 0
    assert not summary["explained"]  # no stop reply: the run says it could not reconcile
    assert "no stop reply" in summary["summary"]
    if case == "overflow":
        assert truth.samples_produced > truth.sent_samples  # the meter's own loss (§4.10)
    assert took < 15


# ------------------------------------------------------------------ faults before sampling

@pytest.fixture
def three_clients(fleet_factory) -> Iterator[tuple[Any, list[socket.socket]]]:
    """A meter whose three client slots (§3.1) are taken by other connections."""
    fleet = fleet_factory(1)
    held = []
    for _ in range(3):
        conn = socket.create_connection(fleet.addresses[0], timeout=5)
        conn.recv(4096)  # the info line: the meter has accepted this client
        held.append(conn)
    yield fleet, held
    for conn in held:
        conn.close()


def test_a_fourth_client_is_refused_with_a_clear_error_and_no_run(
    three_clients, smartmeters, engine
) -> None:
    fleet, _ = three_clients
    (meter,) = smartmeters(fleet)
    _, error, took = fly(engine, [meter], 1.0)
    assert error is not None and meter.meter_label in str(error), error
    assert not engine.docs("start")  # refused before the run opened
    assert fleet.call(fleet.meter(0).truth) is None  # no `sample` ever reached the meter
    assert took < 10


def test_a_meter_that_never_answers_sample_fails_the_run_in_bounded_time(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(1)
    (meter,) = smartmeters(fleet)
    hook = engine.RE.msg_hook

    def stall_at_prepare(msg: Any) -> None:
        hook(msg)
        if msg.command == "prepare":  # the ESP's loop hangs as `sample` arrives
            fleet.inject(0, "stall", seconds=12.0)

    engine.RE.msg_hook = stall_at_prepare
    _, error, took = fly(engine, [meter], 1.0)
    assert error is not None and meter.meter_label in str(error), error
    assert "sample" in str(error)
    stops = engine.docs("stop")
    if stops:  # opened before arming: closed as failed, with the meter's error
        assert stops[0]["exit_status"] == "fail" and meter.meter_label in stops[0]["reason"]
    assert took < 12  # bounded by the device's timeout, not by the meter's stall
