"""The MQTT broker killed or restarted during a fly (issue 9, service faults).

Each test runs its own mosquitto (``tests.mqtt_tools.PrivateBroker``; the shared one of
scripts/services.sh is never stopped) and kills it while the meter samples:

* a TCP fly does not need the broker (it carries only the meters' status, §8): the run
  succeeds, every sample reconciled, although the broker died and came back meanwhile;
* an MQTT fly (§4.14) loses its transport: the run fails with an error naming the meter,
  every stored sample is one the meter published, bit for bit and in order (nothing
  invented), the run's summary counts exactly what was stored and says the device's counts
  are unknown (no stop reply can come without the broker), and the meter ends idle (§4.9).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import pytest

import plans
from smartmeter_ophyd.devices import FlyConfig, SmartMeter
from smartmeter_ophyd.protocol import Measures
from tests.mqtt_tools import PrivateBroker

from ._support import assert_accounted, assert_idle, run_summary, when_sampling

pytestmark = pytest.mark.service


@pytest.fixture
def broker(tmp_path) -> Iterator[PrivateBroker]:
    private = PrivateBroker(tmp_path)
    private.start()
    yield private
    private.stop()


def wait_for_broker(fleet: Any, connected: bool = True) -> None:
    deadline = time.monotonic() + 5
    while fleet.call(fleet.meters[0].mqtt.connected) != connected:
        assert time.monotonic() < deadline, f"the meter's broker connection is not {connected}"
        time.sleep(0.02)


def test_a_tcp_fly_survives_the_broker_dying_and_coming_back(
    fleet_factory, smartmeters, engine, embedded_catalog, broker
) -> None:
    fleet = fleet_factory(1, mqtt_server="127.0.0.1", mqtt_port=broker.port)
    wait_for_broker(fleet)
    (meter,) = smartmeters(fleet)

    def restart() -> None:
        broker.stop()
        time.sleep(0.5)
        broker.start()

    thread = when_sampling(engine, restart, after_s=0.3)
    engine.RE(plans.synchronized_fly([meter], 2.0))
    thread.join(10)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success", stop
    assert_idle(fleet)
    run = embedded_catalog.client[stop["run_start"]]
    summary = assert_accounted(run, meter, fleet.truth(0).sent_samples)
    assert summary["missing_samples"] == 0 and summary["explained"]
    assert broker.proc is not None and broker.proc.poll() is None  # it really came back


RATE = 50
MEASURES = Measures.VI_RMS  # latched: one JSON message per sample at 50 Hz (§4.14)


def test_an_mqtt_fly_whose_broker_dies_fails_naming_the_meter_and_keeps_what_came(
    fleet_factory, engine, embedded_catalog, broker
) -> None:
    fleet = fleet_factory(1, mqtt_server="127.0.0.1", mqtt_port=broker.port)
    wait_for_broker(fleet)
    meter = SmartMeter(*fleet.addresses[0], name="m1", timeout=2.0, reconnect=False,
                       data_directory=embedded_catalog.data_directory,
                       mqtt_broker=("127.0.0.1", broker.port))
    try:
        thread = when_sampling(engine, broker.stop, after_s=1.0)
        config = FlyConfig(rate=RATE, measures=MEASURES, transport="MQTT", n_samples=10 * RATE)
        started = time.monotonic()
        with pytest.raises(Exception) as info:
            engine.RE(plans.fly_meters([meter], config))
        took = time.monotonic() - started
        thread.join(10)
        hdf5_path = meter.hdf5_path
    finally:
        meter.destroy()
    named = f"smartmeter {fleet.names[0]} (mqtt 127.0.0.1:{broker.port})"  # meter and broker
    assert named in str(info.value) and "broker connection lost" in str(info.value), info.value
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and named in stop["reason"], stop
    assert took < 15  # not the 10 s the fly asked for plus waits on a dead broker
    assert_idle(fleet)  # the meter stopped when its broker went (§4.9)

    truth = fleet.truth(0)
    run = embedded_catalog.client[stop["run_start"]]
    summary = run_summary(run, meter)
    with h5py.File(hdf5_path, "r") as f:
        stored = np.stack([f[ch][()] for ch in MEASURES.channels], axis=1)
    received = summary["received_samples"]
    assert len(stored) == received > 0, summary
    assert received <= truth.sent_samples  # nothing invented ...
    assert np.array_equal(stored, truth.values[:received])  # ... and each one the meter's
    details = json.loads(summary["summary"])
    assert not summary["explained"] and details["device_sent_samples"] is None
    assert any("no stop reply" in note for note in details["notes"]), details["notes"]
