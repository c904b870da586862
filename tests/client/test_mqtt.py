"""The library's MQTT side (protocol.md §8, §4.14) against a real mosquitto and emulated
meters: status with honest timestamps, commands, broadcast, state/readings, the MQTT
sampling session, refusals before anything is sent, and a broker restart.

Values are checked against the emulator's ground truth (grid model, session truth).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from smartmeter_ophyd.client import (
    AsyncMqttBroker,
    MeterBusyError,
    MeterCommandError,
    MeterConnectionError,
    MeterTimeoutError,
    MqttBroker,
)
from smartmeter_ophyd.emulator import EmulatedMeter
from smartmeter_ophyd.protocol import GetPeriod, GetPower, GetVoltage, Info, LineValues, Sample
from tests.mqtt_tools import PrivateBroker

from .client_fakes import MeterStarter, unique

pytestmark = pytest.mark.service

T = TypeVar("T")


def truth(meter: EmulatedMeter) -> Any:
    return meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit)


async def with_truths(meter: EmulatedMeter, awaitable: Awaitable[T]) -> tuple[T, list[Any]]:
    """``awaitable``'s result and the ground truth just before and just after it: an
    appliance may switch (every 10 s slot) between the meter's reading and a later truth."""
    before = truth(meter)
    value = await awaitable
    return value, [before, truth(meter)]


def matches_one(actual: Any, candidates: list[Any], **tolerance: float) -> bool:
    return any(actual == pytest.approx(c, **tolerance) for c in candidates)


async def test_status_values_and_timestamps(start_meter: MeterStarter, broker: AsyncMqttBroker) -> None:
    """§8.2: the idle status as typed values; the meter's clock (whole seconds) is kept apart
    from the host's receive time, and an unsynced meter's ts 0 is never used as a time."""
    synced = await start_meter("s", mqtt_status_s=0.3)
    unsynced = await start_meter("u", mqtt_status_s=0.3, ntp_port=9)
    seen: list[Any] = []
    unsubscribe = broker.meter(synced.name).subscribe_status(seen.append)
    status, snaps = await with_truths(synced, broker.meter(synced.name).next_status(timeout=2))
    received = time.time()
    assert matches_one(
        (status.power_w, status.current_a),
        [(float(np.sum(s.active_power[:3])),
          (float(np.sum(s.current_rms[:3])) + s.neutral_current_rms) / 1000) for s in snaps],
        rel=2e-3, abs=0.02,
    ), (status, snaps)
    assert status.voltage_v == pytest.approx(float(np.mean(snaps[-1].voltage_rms[:3])), abs=0.02)
    assert status.meter_ts is not None and abs(status.meter_ts - synced.clock.now()) <= 1.5
    assert status.time_source == "meter" and status.timestamp == float(status.meter_ts)
    assert received - 0.5 < status.received_at <= received
    assert broker.meter(synced.name).status is status and seen and seen[-1] is status
    unsubscribe()

    other = await broker.meter(unsynced.name).next_status(timeout=2)
    assert other.meter_ts is None and other.time_source == "host"
    assert other.timestamp == other.received_at


async def test_commands_state_and_readings(start_meter: MeterStarter, broker: AsyncMqttBroker) -> None:
    """§8.2/§8.3: commands over …/cmd with typed replies and errors; state and the sample
    topic; commands that would act on the meter's TCP client are refused before sending."""
    meter = await start_meter("c")
    m = broker.meter(meter.name)
    view = await m.request(GetVoltage())
    assert isinstance(view, LineValues) and view.unit == "V"
    assert list(view.values) == pytest.approx([float(v) for v in truth(meter).voltage_rms[:3]], rel=2e-3)
    assert (await m.state()).sampling is False

    reading, snaps = await with_truths(meter, m.reading("i"))
    assert reading.unit == "mA"
    assert matches_one(list(reading.values), [[float(v) for v in s.current_rms[:3]] for s in snaps],
                       rel=2e-3, abs=0.011), (reading, snaps)
    meter.stored.energy_wh = [3000.0, 1000.0, 2000.0]
    energy = await m.reading("e")
    assert energy.raw_values[0] == pytest.approx(2.0, abs=0.011)  # L1 1 kWh low (§12 #12)
    assert list(energy.values) == pytest.approx([3.0, 1.0, 2.0], abs=0.011)

    with pytest.raises(MeterCommandError, match=rf"{meter.name}.*TCP"):
        await m.request(Info())
    with pytest.raises(MeterCommandError, match="not known"):
        await m.reading("x")

    session = await m.sample(rate=5, measures="v,i_RMS")
    with pytest.raises(MeterBusyError, match=meter.name):
        await m.request(GetPower())
    assert (await m.state()).sampling is True
    assert m.sampling is True
    await session.stop()
    assert m.sampling is False


async def test_broadcast_reaches_every_meter(start_meter: MeterStarter, broker: AsyncMqttBroker) -> None:
    """§8.2: powermeter/cmd goes to all meters; one reply view per meter; a meter that does
    not answer is named."""
    a, b = await asyncio.gather(start_meter("a"), start_meter("b"))
    views = await broker.broadcast(GetPeriod(), expect={a.name, b.name}, window_s=3)
    assert {a.name, b.name} <= set(views)
    for meter in (a, b):
        view = views[meter.name]
        assert isinstance(view, LineValues) and view.unit == "Hz"
        assert view.values[0] == pytest.approx(float(truth(meter).frequency[0]), abs=0.01)
    ghost = unique("ghost")
    with pytest.raises(MeterTimeoutError, match=ghost):
        await broker.broadcast(GetPeriod(), expect={a.name, ghost}, window_s=0.5)


async def test_mqtt_sampling_session(start_meter: MeterStarter, broker: AsyncMqttBroker) -> None:
    """§4.14: the MQTT transport yields Block values equal to what the meter produced, and
    the stop reply reconciles them; publish times are the meter's clock."""
    meter = await start_meter("x")
    m = broker.meter(meter.name)
    session = await m.sample(Sample(transport="MQTT", rate=10, measures="v,i_RMS"))
    assert session.reply.transport is not None and session.reply.transport.value == "MQTT"
    blocks = []
    deadline = time.monotonic() + 1.3
    while time.monotonic() < deadline:
        block = await session.next_block(timeout=2)
        assert block is not None
        blocks.append(block)
    summary = await session.stop()
    blocks.extend(session.drain_nowait())
    values = np.concatenate([blk.values for blk in blocks])
    truth_values = meter.truth().values  # type: ignore[union-attr]
    np.testing.assert_array_equal(values, truth_values)
    assert blocks[0].channels == ("vrms_l1", "vrms_l2", "vrms_l3", "irms_l1", "irms_l2", "irms_l3") \
        or len(blocks[0].channels) == 6
    assert all(blk.packets.size == 0 for blk in blocks)
    assert summary.explained and summary.unexplained == 0
    assert summary.received_samples == summary.device_sent_samples == len(truth_values)
    stamps = session.publish_times
    assert len(stamps) == len(truth_values) and stamps == sorted(stamps)
    assert stamps[0] >= float(session.reply.start_ts or 0)


async def test_sampling_refusals_before_sending(start_meter: MeterStarter, broker: AsyncMqttBroker) -> None:
    """Refused with the meter's name and the reason, before anything reaches the meter:
    too high a rate, another transport, a scheduled start, and a start whose reply would
    not fit PubSubClient's 256-byte packet (§8.3)."""
    meter = await start_meter("r")
    m = broker.meter(meter.name)
    with pytest.raises(MeterCommandError, match=rf"{meter.name}.*at most 50 Hz"):
        await m.sample(rate=100)
    with pytest.raises(MeterCommandError, match="transport MQTT"):
        await m.sample(Sample(transport="TCP", rate=10))
    with pytest.raises(MeterCommandError, match="scheduled"):
        await m.sample(rate=10, start_time=int(time.time()) + 5)
    long_name = "n" * 19
    with pytest.raises(MeterCommandError, match=rf"{long_name}.*256-byte"):
        await broker.meter(long_name).sample(rate=10, measures="v,i_RMS")
    assert meter.session is None


async def test_broker_restart(start_meter: MeterStarter, tmp_path: Path) -> None:
    """The broker dies: a request in flight fails naming the meter, a running MQTT session
    ends as 'connection lost'; once the broker is back, the library and the meter both
    reconnect and commands work again."""
    private = PrivateBroker(tmp_path)
    private.start()
    try:
        meter = await start_meter("p", broker=("127.0.0.1", private.port))
        async with AsyncMqttBroker("127.0.0.1", private.port, timeout=2.0, reconnect_s=0.2) as b:
            m = b.meter(meter.name)
            session = await m.sample(rate=5, measures="p,q")
            await session.next_block(timeout=2)
            private.stop()
            with pytest.raises(MeterConnectionError, match=meter.name):
                async for _ in session:
                    pass
            assert session.summary is not None and session.summary.ended_by == "connection lost"
            with pytest.raises(MeterConnectionError, match=meter.name):
                await m.request(GetVoltage())
            private.start()
            deadline = time.monotonic() + 4
            while not (b.connected and meter.mqtt.connected()):
                assert time.monotonic() < deadline, "no reconnect after the broker came back"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the meter's subscriptions
            assert (await m.state()).sampling is False  # its session ended with the broker
            assert isinstance(await m.request(GetVoltage()), LineValues)
    finally:
        private.stop()


async def test_blocking_facade(start_meter: MeterStarter, mqtt_broker: tuple[str, int]) -> None:
    """MqttBroker runs on the shared client loop thread and gives the same answers."""
    meter = await start_meter("f")

    def work() -> tuple[Any, Any]:
        with MqttBroker(*mqtt_broker, timeout=3.0) as b:
            return b.state(meter.name), b.request(meter.name, GetVoltage())

    state, view = await asyncio.to_thread(work)
    assert state.sampling is False and isinstance(view, LineValues)
