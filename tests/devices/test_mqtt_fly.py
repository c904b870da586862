"""SmartMeter flies with ``transport="MQTT"`` (§4.14) through a RunEngine, against a real
mosquitto and an emulated meter that publishes every sample to it; every sample is checked
against the emulator's ground truth (``fleet.truth``), never against the device's output."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from plans import fly_meters
from smartmeter_ophyd.client import MeterCommandError, MeterConnectionError, MqttBroker
from smartmeter_ophyd.devices import FlyConfig, SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.protocol import Measures
from tests.run_engines import RunEngine

pytestmark = pytest.mark.service

RATE = 50
N_SAMPLES = 20
MEASURES = Measures.VI_RMS


@pytest.fixture
def mqtt_fleet(mqtt_broker: tuple[str, int]) -> Iterator[EmulatorFleet]:
    """One emulated meter connected to the test broker (names unique per process: the broker
    is shared with other test processes)."""
    host, port = mqtt_broker
    with EmulatorFleet(1, name_prefix=f"mf{os.getpid() % 100000}x", mqtt_server=host,
                       mqtt_port=port) as fleet:
        deadline = time.monotonic() + 3
        while not fleet.call(fleet.meters[0].mqtt.connected):
            assert time.monotonic() < deadline, "the emulated meter did not reach the broker"
            time.sleep(0.02)
        time.sleep(0.1)  # its SUBACKs
        yield fleet


def smartmeter(fleet: EmulatorFleet, tmp_path: Path, **kwargs: Any) -> SmartMeter:
    return SmartMeter("127.0.0.1", fleet.ports[0], name="m1", data_directory=tmp_path,
                      timeout=2.0, **kwargs)


def fly(meter: SmartMeter, **config: Any) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    settings = {"rate": RATE, "measures": MEASURES, "transport": "MQTT",
                "n_samples": N_SAMPLES, **config}
    engine(fly_meters([meter], FlyConfig(**settings)))
    return docs


def test_mqtt_fly_records_every_sample_the_meter_published(
    mqtt_fleet: EmulatorFleet, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    meter = smartmeter(mqtt_fleet, tmp_path, mqtt_broker=mqtt_broker)
    try:
        meter.connect()
        docs = fly(meter)
        broker = meter._own_broker  # the samples came through the device's own connection
        assert broker is not None and (broker.host, broker.port) == mqtt_broker
        truth = mqtt_fleet.truth(0)
        assert not truth.active and truth.measures == MEASURES.reported
        n = truth.sent_samples
        assert n >= N_SAMPLES  # the target, plus what the meter published before the stop
        summary = meter.last_summary
        assert summary is not None and summary.explained, summary
        assert summary.received_samples == n and summary.ended_by == "stop"

        with h5py.File(meter.hdf5_path, "r") as f:
            got = np.stack([f[ch][:] for ch in MEASURES.channels], axis=1)
            stored = json.loads(f.attrs["stop_summary"])
        assert got.shape == (n, len(MEASURES.channels))
        # one JSON message per sample (§4.14): the printed float32 parses back to itself
        assert np.array_equal(got, truth.values[:n])
        assert stored["stop_requested"] == f"{N_SAMPLES} samples reached"

        names = [name for name, _ in docs]
        assert names[0] == "start" and names[-1] == "stop"
        start, stop = docs[0][1], docs[-1][1]
        assert stop["exit_status"] == "success", stop
        assert start["meters"]["m1"]["fly"]["transport"] == "MQTT"
        assert start["meters"]["m1"]["mqtt_broker"] == "{}:{}".format(*mqtt_broker)
        datums = [d for name, d in docs if name == "stream_datum"
                  and d["descriptor"] in {dd["uid"] for nn, dd in docs
                                          if nn == "descriptor" and dd["name"] == "m1"}]
        assert max(d["indices"]["stop"] for d in datums) == n  # the run covers every sample
    finally:
        meter.destroy()
    assert meter._own_broker is None  # the device closed the connection it opened


def test_a_shared_broker_serves_mqtt_flies_and_stays_open(
    mqtt_fleet: EmulatorFleet, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    with MqttBroker(*mqtt_broker, timeout=2.0) as broker:
        meter = smartmeter(mqtt_fleet, tmp_path, mqtt_broker=broker)
        try:
            meter.connect()
            fly(meter, n_samples=11)
            truth = mqtt_fleet.truth(0)
            summary = meter.last_summary
            assert summary is not None and summary.explained
            assert summary.received_samples == truth.sent_samples >= 11
        finally:
            meter.destroy()
        assert broker.async_broker.connected  # the device never closes a broker it was given


def test_the_default_broker_is_the_meters_own_on_port_1883(
    mqtt_fleet: EmulatorFleet, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    """No mqtt_broker: the meter's mqtt_server on 1883 (§8.1).  The test broker listens on
    another port, so the connect fails - naming the meter, that broker and the way out -
    before the meter is asked to sample."""
    host, port = mqtt_broker
    assert port != 1883
    meter = smartmeter(mqtt_fleet, tmp_path)
    try:
        meter.connect()
        assert meter.mqtt_server.get() == host  # what the meter's info line says
        meter.prepare({"rate": RATE, "measures": MEASURES, "transport": "MQTT",
                       "n_samples": N_SAMPLES}).wait(3)
        with pytest.raises(MeterConnectionError, match=rf"{re.escape(meter.meter_label)}.*"
                           rf"{re.escape(host)}:1883.*mqtt_server setting.*"
                           r"mqtt_broker=\(host, port\)"):
            meter.kickoff()
        with pytest.raises(LookupError):  # the meter was never asked to sample
            mqtt_fleet.truth(0)
    finally:
        meter.destroy()


def test_a_meter_without_mqtt_server_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    with EmulatorFleet(1, name_prefix="nomqtt") as fleet:  # mqttServer "-": MQTT off (§3.3)
        meter = smartmeter(fleet, tmp_path)
        try:
            meter.connect()
            meter.prepare({"rate": RATE, "measures": MEASURES, "transport": "MQTT",
                           "n_samples": N_SAMPLES}).wait(3)
            with pytest.raises(MeterCommandError, match=r"smartmeter nomqtt1.*no MQTT server"):
                meter.kickoff()
            with pytest.raises(LookupError):  # the meter never sampled
                fleet.truth(0)
        finally:
            meter.destroy()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"start_time": 2_000_000_000}, "256-byte packet"),
        ({"flow_control": "reqSamples", "request_size": 20}, "publishes every sample itself"),
        ({"slot": (0, 2)}, "slots only work with TCP or Serial"),
    ],
)
def test_mqtt_settings_the_firmware_cannot_honour_are_refused(settings: dict[str, Any],
                                                               message: str) -> None:
    base = {"rate": RATE, "measures": "VI_RMS", "transport": "MQTT"}
    with pytest.raises(MeterCommandError, match=rf"smartmeter x.*{message}"):
        FlyConfig.from_value({**base, **settings}, "smartmeter x")


@pytest.mark.parametrize("value", ["", "-", ("host", 0), ("host", "1883"), ("", 1883), 1883])
def test_a_bad_mqtt_broker_names_the_meter(value: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"smartmeter m1: mqtt_broker="):
        SmartMeter("127.0.0.1", name="m1", data_directory=tmp_path, mqtt_broker=value)
