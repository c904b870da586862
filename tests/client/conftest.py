"""Fixtures for the client tests: emulated meters and a scripted fake peer, on real sockets.

Every server binds 127.0.0.1 port 0 (ephemeral), so parallel runs never collide.  Every test
runs under the leak guard (tests/leak_guard.py): no thread, task or socket may outlive it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from smartmeter_ophyd.emulator import EmulatedMeter

from .client_fakes import emulator_config, start_sntp


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

