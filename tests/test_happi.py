"""The happi example (``examples/happi_db.json``) builds a SmartMeter, and an entry pointing at an
emulated meter gives a device that connects and reads the meter's own identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

happi = pytest.importorskip("happi")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "happi_db.json"


def test_the_example_builds_a_smartmeter_without_io() -> None:
    from smartmeter_ophyd.devices import SmartMeter

    client = happi.Client(path=str(EXAMPLE))
    meter = happi.from_container(client.find_item(name="smartmeter_lab1"))
    try:
        assert isinstance(meter, SmartMeter)
        assert (meter.name, meter.host, meter.port) == ("smartmeter_lab1", "192.0.2.21", 54321)
        assert not meter.connected  # building it did not touch the network
    finally:
        meter.destroy()


def test_an_entry_for_an_emulated_meter_connects(tmp_path: Path) -> None:
    from smartmeter_ophyd.emulator import EmulatorFleet

    entry = json.loads(EXAMPLE.read_text())["smartmeter_lab1"]
    with EmulatorFleet(1, name_prefix="happi") as fleet:
        host, port = fleet.addresses[0]
        entry.update(_id="bench", name="bench", args=[host])
        entry["kwargs"].update(port=port, data_directory=str(tmp_path))
        db = tmp_path / "db.json"
        db.write_text(json.dumps({"bench": entry}))
        meter = happi.from_container(happi.Client(path=str(db)).find_item(name="bench"))
        try:
            info = meter.connect()
            assert info.name == fleet.names[0] and info.version == "2.2"
            assert meter.firmware_version.get() == "2.2"
        finally:
            meter.destroy()
