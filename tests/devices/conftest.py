"""Fixtures for the device tests: emulated meters on a loop thread, catalogs, a connected meter.

The embedded catalog gets its own profile name (``smartmeter-devtest-<pid>``) so it never
collides with the storage tests' catalog in the same session; the PostgreSQL-backed Tiled
server fixture is the storage tests' own (imported, so it starts its own private cluster on
ephemeral ports when these tests ask for it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from smartmeter_ophyd.demo import EmulatedMeters
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.storage import EmbeddedCatalog, setup_embedded_catalog
from tests.storage.conftest import postgres_server  # noqa: F401  (re-exported fixture)


@pytest.fixture(scope="session")
def device_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCatalog]:
    root = tmp_path_factory.mktemp("devices-catalog")
    catalog = setup_embedded_catalog(
        root / "catalog", profile=f"smartmeter-devtest-{os.getpid()}", profiles_dir=root / "profiles"
    )
    yield catalog
    catalog.close()


@pytest.fixture
def emulated() -> Iterator[EmulatedMeters]:
    with EmulatedMeters(1, name_prefix="dev") as meters:
        yield meters


@pytest.fixture
def meter(emulated: EmulatedMeters, tmp_path) -> Iterator[SmartMeter]:
    device = SmartMeter(
        "127.0.0.1", emulated.meters[0].command_port, name="m1",
        data_directory=tmp_path / "hdf5", timeout=2.0,
    )
    device.connect()
    yield device
    device.destroy()
