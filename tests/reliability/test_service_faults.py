"""The NTP server unreachable, slow or answering nonsense (issue 9, service faults).

The plan's NTP gate (§6.2) must fail before any sample is sent, with the gate's table of
every meter's attempts, and leave each meter idle; no run is opened.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import plans


@pytest.fixture
def nonsense_ntp(request: pytest.FixtureRequest) -> Iterator[int]:
    """A UDP server answering every request with ``request.param`` (48 bytes of nonsense)."""
    answer: bytes = request.param
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                _, peer = server.recvfrom(512)
            except TimeoutError:
                continue
            server.sendto(answer, peer)

    thread = threading.Thread(target=serve, name="nonsense ntp", daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join(2)
    server.close()


def gate_fails(engine: Any, meters: list[Any], fleet: Any) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(plans.NtpGateError) as info:
        engine.RE(plans.synchronized_fly(meters, 1.0, ntp_attempts=2))
    took = time.monotonic() - started
    assert not engine.docs("start")  # no run, no sample
    for i in range(len(meters)):
        assert fleet.call(fleet.meter(i).truth) is None, "a meter was sent `sample`"
    message = str(info.value)
    assert "no sample was sent" in message
    for meter in meters:  # the table names every meter
        assert meter.meter_label in message or meter.name in message
    return message, took


def test_an_unreachable_time_server_fails_the_gate_before_any_sample(
    fleet_factory, smartmeters, engine
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    # the user configured a time server nobody answers at (§6.2: the sync times out)
    fleet.call(lambda: setattr(fleet.meter(1).stored, "time_server", "127.0.0.3"))
    message, took = gate_fails(engine, meters, fleet)
    assert "1 of 2 meters" in message
    assert took < 30


def test_a_slow_time_server_leaves_the_confidence_above_the_gate(
    fleet_factory, smartmeters, engine
) -> None:
    fleet = fleet_factory(1)
    meters = smartmeters(fleet)
    fleet.set_network(0, delay_s=0.02)  # half a 40 ms round trip: 20 ms > 5 ms
    message, took = gate_fails(engine, meters, fleet)
    assert "at most 5 ms" in message
    assert took < 20


@pytest.mark.parametrize("nonsense_ntp", [
    pytest.param(b"\x00" * 48, id="zeros"),  # transmit time 1900: rejected (§6.2)
    pytest.param(b"\xff" * 48, id="ones"),
], indirect=True)
def test_a_time_server_answering_nonsense_fails_the_gate(
    fleet_factory, smartmeters, engine, nonsense_ntp
) -> None:
    fleet = fleet_factory(1)
    meters = smartmeters(fleet)
    fleet.call(lambda: setattr(fleet.meter(0).config, "ntp_port", nonsense_ntp))
    message, took = gate_fails(engine, meters, fleet)
    assert took < 30
