"""Fixtures for the client tests: emulated meters and a scripted fake peer, on real sockets.

Every server binds 127.0.0.1 port 0 (ephemeral), so parallel runs never collide.  Every test
runs under the leak guard (tests/leak_guard.py): no thread, task or socket may outlive it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from smartmeter_ophyd.client import AsyncMqttBroker
from smartmeter_ophyd.emulator import EmulatedMeter

from .client_fakes import MeterStarter, emulator_config, start_sntp, unique


@pytest.fixture
async def meter() -> AsyncIterator[EmulatedMeter]:
    emulated = EmulatedMeter(emulator_config())
    await emulated.start()
    try:
        yield emulated
    finally:
        await emulated.stop()


@pytest.fixture
async def synced_meter() -> AsyncIterator[EmulatedMeter]:
    """A meter whose time server is a local SNTP responder: NTP syncs succeed (§6.2)."""
    transport, port = await start_sntp()
    emulated = EmulatedMeter(emulator_config(time_server="127.0.0.1", ntp_port=port))
    await emulated.start()
    try:
        yield emulated
    finally:
        await emulated.stop()
        transport.close()


@pytest.fixture
async def serial_meter() -> AsyncIterator[EmulatedMeter]:
    emulated = EmulatedMeter(emulator_config(serial=True, name="emuser"))
    await emulated.start()
    try:
        yield emulated
    finally:
        await emulated.stop()


@pytest.fixture
async def start_meter(mqtt_broker: tuple[str, int]) -> AsyncIterator[MeterStarter]:
    """Emulated meters connected to ``mqtt_broker`` (or to ``broker=``), NTP-synced."""
    transport, ntp_port = await start_sntp()
    meters: list[EmulatedMeter] = []

    async def start(tag: str, broker: tuple[str, int] = mqtt_broker, **kw: Any) -> EmulatedMeter:
        settings: dict[str, Any] = {"time_server": "127.0.0.1", "ntp_port": ntp_port}
        settings.update(kw)
        meter = EmulatedMeter(emulator_config(name=unique(tag), mqtt_server=broker[0],
                                              mqtt_port=broker[1], **settings))
        await meter.start()
        meters.append(meter)
        deadline = time.monotonic() + 3
        while not meter.mqtt.connected():
            assert time.monotonic() < deadline, "emulated meter did not reach the broker"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # its subscriptions
        return meter

    yield start
    for meter in meters:
        await meter.stop()
    transport.close()


@pytest.fixture
async def broker(mqtt_broker: tuple[str, int]) -> AsyncIterator[AsyncMqttBroker]:
    async with AsyncMqttBroker(*mqtt_broker, timeout=3.0) as b:
        yield b
