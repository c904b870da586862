"""Fixtures for the plan tests: an emulator fleet timed by the real chrony, SmartMeter devices
on it, and a RunEngine that writes into the session's embedded catalog through its document
sink (``embedded_catalog.document_sink()``: a journal here, a writer process there).

The meters' NTP syncs go to chronyd on loopback (``ntp_server``) unless a test gives the
fleet another time server.  Every message the RunEngine processes is recorded with the host
time it was processed at (``engine.messages``), every document too (``engine.documents``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from tests.run_engines import RunEngine


@pytest.fixture
def fleet_factory(ntp_server) -> Iterator[Any]:
    fleets: list[EmulatorFleet] = []

    def make(meters: Any = 1, *, chrony: bool = True, **common: Any) -> EmulatorFleet:
        if chrony:
            common.setdefault("time_server", ntp_server[0])
            common.setdefault("ntp_port", ntp_server[1])
        fleet = EmulatorFleet(meters, name_prefix="plan", **common)
        fleets.append(fleet)
        return fleet.start()

    yield make
    for fleet in fleets:
        fleet.close()


@pytest.fixture
def smartmeters(embedded_catalog) -> Iterator[Any]:
    made: list[SmartMeter] = []

    def make(fleet: EmulatorFleet, **kwargs: Any) -> list[SmartMeter]:
        meters = [
            SmartMeter(host, port, name=f"m{i + 1}",
                       data_directory=embedded_catalog.data_directory, timeout=3.0, **kwargs)
            for i, (host, port) in enumerate(fleet.addresses)
        ]
        made.extend(meters)
        return meters

    yield make
    for meter in made:
        meter.destroy()


@dataclass
class Engine:
    """A RunEngine subscribed to the embedded catalog, recording messages and documents."""

    RE: RunEngine
    documents: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    messages: list[tuple[float, Any]] = field(default_factory=list)

    def docs(self, name: str) -> list[dict[str, Any]]:
        return [doc for kind, doc in self.documents if kind == name]

    def commands(self, command: str) -> list[tuple[float, Any]]:
        return [(t, msg) for t, msg in self.messages if msg.command == command]


@pytest.fixture
def engine(embedded_catalog) -> Engine:
    # What users get: the sink journals each document and waits at the stop document until
    # its writer process has closed the run, so the run reads back once RE(...) returns.
    sink = embedded_catalog.document_sink()
    assert sink.wait_ready(60.0), f"the catalog writer did not start, see {sink.writer_log}"
    RE = RunEngine({})
    recorder = Engine(RE)
    RE.subscribe(sink)
    RE.subscribe(lambda name, doc: recorder.documents.append((name, doc)))
    RE.msg_hook = lambda msg: recorder.messages.append((time.time(), msg))
    return recorder
