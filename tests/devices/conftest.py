"""Fixtures for the device tests: emulated meters on a loop thread, catalogs, a connected meter.

The catalogs (``embedded_catalog``, ``postgres_server``) are the session-wide fixtures of
``tests/conftest.py``, shared with the storage tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet


@pytest.fixture
def emulated() -> Iterator[EmulatorFleet]:
    with EmulatorFleet(1, name_prefix="dev") as meters:
        yield meters


@pytest.fixture
def meter(emulated: EmulatorFleet, tmp_path) -> Iterator[SmartMeter]:
    device = SmartMeter(
        "127.0.0.1", emulated.meters[0].command_port, name="m1",
        data_directory=tmp_path / "hdf5", timeout=2.0,
    )
    device.connect()
    yield device
    device.destroy()
