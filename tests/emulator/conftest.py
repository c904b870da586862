"""Fixtures for emulator tests: a local SNTP server and meters on ephemeral ports.

The raw wire helpers live in ``emulator_wire`` (a plain module, so tests can import them
without colliding with other directories' conftest modules).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from smartmeter_ophyd.emulator import EmulatedMeter, EmulatorConfig

from .emulator_wire import NtpServer, RawClient, _SntpServer, close_tracked, open_client


@pytest.fixture(autouse=True)
async def close_raw_connections() -> AsyncIterator[None]:
    """Close the test's raw connections (``open_client``, ``track``) once it is done."""
    yield
    await close_tracked()


@pytest.fixture
async def ntp_server() -> AsyncIterator[NtpServer]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _SntpServer, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    yield NtpServer(port, protocol)
    transport.close()


MeterFactory = Callable[..., Awaitable[EmulatedMeter]]


@pytest.fixture
async def make_meter(ntp_server: NtpServer) -> AsyncIterator[MeterFactory]:
    meters: list[EmulatedMeter] = []

    async def factory(**overrides: Any) -> EmulatedMeter:
        kwargs: dict[str, Any] = {
            "name": f"test{len(meters)}",
            "time_server": "127.0.0.1",
            "ntp_port": ntp_server.port,
            "boot_delay_s": 0.05,
            "serial": False,
            "stream_server_port": 9,  # nothing listens there unless a test says so
        }
        kwargs.update(overrides)
        meter = EmulatedMeter(EmulatorConfig(**kwargs))
        await meter.start()
        meters.append(meter)
        return meter

    yield factory
    for meter in meters:
        await meter.stop()


@pytest.fixture
async def meter(make_meter: MeterFactory) -> EmulatedMeter:
    return await make_meter()


@pytest.fixture
async def client(meter: EmulatedMeter) -> AsyncIterator[RawClient]:
    c = await open_client(meter.command_port)
    yield c
    await c.close()
