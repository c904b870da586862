"""MeterMqttStatus: a meter's MQTT status (protocol.md §8.2) as ophyd signals, against a
real mosquitto and an emulated meter fleet; values from the grid model's ground truth."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from bluesky import plans as bp

from smartmeter_ophyd.client import MeterTimeoutError, MqttBroker
from smartmeter_ophyd.devices import MeterMqttStatus
from smartmeter_ophyd.emulator import EmulatorFleet
from tests.run_engines import RunEngine

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


async def test_fly_controller_takes_an_mqtt_meter(mqtt_broker: tuple[str, int], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The fly path (FlyController) runs an MQTT session unchanged: AsyncMqttMeter offers
    what it uses of a client (meter_label, subscribe_logs, sample(SampleConfig)); the HDF5
    file gets exactly the samples the meter produced and the summary reconciles."""
    import asyncio

    import h5py

    from smartmeter_ophyd.client import AsyncMqttBroker
    from smartmeter_ophyd.devices import CtsPolicy, FlyConfig
    from smartmeter_ophyd.devices._controller import FlyController
    from smartmeter_ophyd.emulator import EmulatedMeter, EmulatorConfig
    from smartmeter_ophyd.storage import WaveformWriter

    name = f"fl{os.getpid() % 100000}"
    meter = EmulatedMeter(EmulatorConfig(name=name, serial=False, boot_delay_s=0.05, ntp_port=9,
                                         time_server="127.0.0.1", mqtt_server=mqtt_broker[0],
                                         mqtt_port=mqtt_broker[1]))
    await meter.start()
    path = tmp_path / "fly.h5"
    try:
        while not meter.mqtt.connected():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        async with AsyncMqttBroker(*mqtt_broker) as broker:
            config = FlyConfig(rate=10, measures="v,i_RMS", transport="MQTT", n_samples=15)

            def open_writer(reply):  # type: ignore[no-untyped-def]
                return WaveformWriter(path, reply.measures, reply.sampling_rate,
                                      reply.start_ts or 0.0, {"name": name})

            controller = FlyController(client=broker.meter(name), config=config,  # type: ignore[arg-type]
                                       open_writer=open_writer, cts_policy=CtsPolicy(),
                                       silence_s=3.0)
            await controller.kickoff()
            outcome = await asyncio.wait_for(controller.wait(), 10)
        assert outcome.error is None, outcome.error
        assert outcome.summary is not None and outcome.summary.explained
        truth = meter.truth()
        assert truth is not None and outcome.samples_written == truth.values.shape[0] >= 15
    finally:
        await meter.stop()
    with h5py.File(path) as f:
        datasets = [f[k] for k in f.keys() if isinstance(f[k], h5py.Dataset)]
        assert datasets, list(f.keys())
