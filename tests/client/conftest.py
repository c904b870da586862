"""Fixtures for the client tests: emulated meters and a scripted fake peer, on real sockets.

Every server binds 127.0.0.1 port 0 (ephemeral), so parallel runs never collide.  Every test
runs under the leak guard (tests/leak_guard.py): no thread, task or socket may outlive it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartmeter_ophyd.emulator import EmulatedMeter
from tests.leak_guard import _leak_guard_tasks, leak_guard  # noqa: F401 (autouse guard)

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Warnings are errors here (not yet project-wide: see docs/explanations/architecture.md)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("error"))
