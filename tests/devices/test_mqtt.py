"""MeterMqttStatus: a meter's MQTT status (protocol.md §8.2) as ophyd signals, against a
real mosquitto and an emulated meter fleet; values from the grid model's ground truth."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plans as bp

from smartmeter_ophyd.client import MeterTimeoutError, MqttBroker
from smartmeter_ophyd.devices import MeterMqttStatus
from smartmeter_ophyd.emulator import EmulatorFleet

pytestmark = pytest.mark.service


@pytest.fixture
def fleet(mqtt_broker: tuple[str, int]) -> Iterator[EmulatorFleet]:
    host, port = mqtt_broker
    with EmulatorFleet(2, name_prefix=f"st{os.getpid() % 100000}x", mqtt_server=host,
                       mqtt_port=port, mqtt_status_s=0.3) as meters:
        deadline = time.monotonic() + 3
        while not all(meters.call(m.mqtt.connected) for m in meters.meters):
            assert time.monotonic() < deadline, "emulated meters did not reach the broker"
            time.sleep(0.02)
        yield meters


def test_status_signals_count_and_monitor(fleet: EmulatorFleet, mqtt_broker: tuple[str, int]) -> None:
    """Signals carry each status with the meter's clock as timestamp (it synced NTP); a
    trigger waits for a fresh status; bp.count records it; subscriptions see arrivals."""
    name = fleet.names[0]
    with MqttBroker(*mqtt_broker, timeout=3.0) as broker:
        status = MeterMqttStatus(name, broker=broker, name="st")
        seen: list[float] = []
        status.power.subscribe(lambda value, **kw: seen.append(value), run=False)
        status.trigger().wait(3)
        reading = status.read()
        meter = fleet.meters[0]
        snap = fleet.call(lambda: meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit))
        assert reading["st_power"]["value"] == pytest.approx(
            float(np.sum(snap.active_power[:3])), rel=2e-3, abs=0.02)
        assert reading["st_voltage"]["value"] == pytest.approx(float(np.mean(snap.voltage_rms[:3])), abs=0.02)
        meter_ts = reading["st_meter_ts"]["value"]
        assert meter_ts > 0 and reading["st_time_source"]["value"] == "meter"
        assert reading["st_power"]["timestamp"] == float(meter_ts)
        assert abs(meter_ts - fleet.call(meter.clock.now)) <= 1.5
        assert time.time() - 1 < reading["st_received_at"]["value"] <= time.time()
        assert status.describe()["st_power"]["units"] == "W"
        assert set(status.hints["fields"]) == {"st_power", "st_voltage"}

        docs: list[tuple[str, dict]] = []
        RE = RunEngine({})
        RE(bp.count([status], num=2), lambda n, d: docs.append((n, d)))
        events = [d for n, d in docs if n == "event"]
        assert len(events) == 2
        assert events[0]["data"]["st_meter_ts"] <= events[1]["data"]["st_meter_ts"]
        assert events[0]["data"]["st_received_at"] < events[1]["data"]["st_received_at"]
        assert seen, "no status reached the subscription"
        status.close()


def test_trigger_fails_naming_the_meter_while_it_samples(fleet: EmulatorFleet,
                                                         mqtt_broker: tuple[str, int]) -> None:
    """§8.3: no status while sampling: the trigger fails after its timeout, naming the meter."""
    name = fleet.names[1]
    device = MeterMqttStatus(name, host=mqtt_broker[0], port=mqtt_broker[1], status_timeout=0.8)
    try:
        device.trigger().wait(3)
        with socket.create_connection(fleet.addresses[1], timeout=3) as tcp:
            tcp.sendall(b'{"cmd":"sample","payload":{"type":"TCP","rate":50}}\n')
            time.sleep(0.4)  # the reply; a status already in flight arrives
            with pytest.raises(MeterTimeoutError, match=rf"{name}.*while the meter samples"):
                device.trigger().wait(3)
    finally:
        device.close()
