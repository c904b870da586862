"""Fixtures for the client tests: emulated meters and a scripted fake peer, on real sockets.

Every server binds 127.0.0.1 port 0 (ephemeral), so parallel runs never collide.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from smartmeter_ophyd.emulator._meter import EmulatedMeter

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


@pytest.fixture
def no_thread_left() -> Any:
    """Assert that a test leaves no extra thread running."""
    before = set(threading.enumerate())
    yield
    for _ in range(50):
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"threads left behind: {extra}")
