"""``HostClock`` over real UDP: the real chrony, the fleet's SNTP responder serving time offset
by a known amount (the truth), and time servers that are dead, silent or talk nonsense."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import pytest

from smartmeter_ophyd.devices import HostClock, HostClockError
from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.protocol import client_request, server_reply
from tests.run_engines import RunEngine


class UdpResponder:
    """A UDP server on a thread answering each datagram with ``answer(request)`` datagrams."""

    def __init__(self, answer: Callable[[bytes], list[bytes]]) -> None:
        self._answer = answer
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test udp responder")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(1024)
            except TimeoutError:
                continue
            for reply in self._answer(data):
                self._sock.sendto(reply, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def responder() -> Iterator[Callable[[Callable[[bytes], list[bytes]]], UdpResponder]]:
    started: list[UdpResponder] = []

    def start(answer: Callable[[bytes], list[bytes]]) -> UdpResponder:
        started.append(UdpResponder(answer))
        return started[-1]

    yield start
    for r in started:
        r.close()


STAMPS_S = 2e-4
"""Slack for the timestamps themselves (chronyd's transmit stamp, float rounding).  Beyond it,
an SNTP offset is off the truth by at most half the round trip, whatever the path's
asymmetry: the bound the tests hold the device to, rather than a flat figure a loaded host
can exceed."""


def _measure(clock: HostClock) -> tuple[float, float]:
    clock.trigger().wait(10)
    reading = clock.read()
    return reading[f"{clock.name}_offset_s"]["value"], reading[f"{clock.name}_delay_s"]["value"]


def test_against_chrony_the_host_clock_is_right(ntp_server):
    clock = HostClock(*ntp_server)
    offset, delay = _measure(clock)
    assert 0 < delay < 0.01
    assert abs(offset) <= delay / 2 + STAMPS_S, (offset, delay)  # chronyd serves this clock
    assert clock.read_configuration()["host_clock_server"]["value"] == "{}:{}".format(*ntp_server)


@pytest.mark.parametrize("truth", [0.3, -0.3])
def test_against_an_offset_server_the_offset_is_the_truth_within_half_the_round_trip(truth):
    with EmulatorFleet(1, name_prefix="hc", time_offset_s=truth) as fleet:
        clock = HostClock(*fleet.sntp_address)  # the default 4 queries
        offset, delay = _measure(clock)
        fleet.time_offset_s = -truth  # and back the other way, on the same device
        flipped, flipped_delay = _measure(clock)
    assert delay < 0.01 and flipped_delay < 0.01
    assert abs(offset - truth) <= delay / 2 + STAMPS_S, (offset, delay)
    assert abs(flipped + truth) <= flipped_delay / 2 + STAMPS_S, (flipped, flipped_delay)
    assert clock.last_measurement is not None and clock.last_measurement.stratum == 1


def test_a_dead_port_is_unreachable_naming_the_server():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = HostClock("127.0.0.1", port, timeout=0.5)
    with pytest.raises(HostClockError, match=rf"^time server 127\.0\.0\.1:{port}: unreachable"):
        clock.trigger().wait(5)


def test_an_unknown_name_is_reported():
    with pytest.raises(HostClockError, match=r"no-such-host\.invalid:123: cannot resolve"):
        HostClock("no-such-host.invalid").trigger().wait(10)


def test_a_silent_server_times_out(responder):
    silent = responder(lambda request: [])
    clock = HostClock("127.0.0.1", silent.port, timeout=0.1, queries=2)
    with pytest.raises(HostClockError, match=r"no reply within 0\.1 s \(2 of 2 queries\)"):
        clock.trigger().wait(5)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (lambda request: [b"\x00" * 20], "nonsense reply: SNTP packet of 20 bytes"),
        (lambda request: [client_request(1.7e9)], "nonsense reply: SNTP reply has mode 3"),
        (lambda request: [server_reply(request, 1.7e9, 1.7e9, stratum=0)], "unsynchronised"),
        (lambda request: [server_reply(request, 1.7e9, 1.7e9 + 5)], "negative round trip"),
    ],
)
def test_nonsense_replies_are_refused(responder, answer, problem):
    server = responder(answer)
    clock = HostClock("127.0.0.1", server.port, timeout=0.5, queries=2)
    with pytest.raises(HostClockError, match=problem) as caught:
        clock.trigger().wait(5)
    assert str(caught.value).startswith(f"time server 127.0.0.1:{server.port}: ")


def test_a_late_reply_to_an_earlier_request_is_skipped(responder):
    """A reply whose originate is not this request's transmit time answers an earlier,
    timed-out query: it must be skipped, and the real reply (+2 s) taken."""

    def answer(request: bytes) -> list[bytes]:
        now = time.time() + 2.0
        stale = server_reply(client_request(now - 100.0), now - 50.0, now - 50.0)
        return [stale, server_reply(request, now, now)]

    server = responder(answer)
    clock = HostClock("127.0.0.1", server.port, queries=3)
    offset, delay = _measure(clock)
    assert abs(offset - 2.0) <= delay / 2 + STAMPS_S, (offset, delay)


def test_trigger_and_read_in_a_run_engine(ntp_server):
    clock = HostClock(*ntp_server)
    docs: list[tuple[str, dict[str, Any]]] = []

    def plan():  # type: ignore[no-untyped-def]
        yield from bps.open_run()
        yield from bps.trigger_and_read([clock])
        yield from bps.close_run()

    RunEngine({})(plan(), lambda name, doc: docs.append((name, doc)))
    event = next(doc for name, doc in docs if name == "event")
    offset, delay = event["data"]["host_clock_offset_s"], event["data"]["host_clock_delay_s"]
    assert abs(offset) <= delay / 2 + STAMPS_S, (offset, delay)
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    assert descriptor["data_keys"]["host_clock_offset_s"]["units"] == "s"
    assert descriptor["configuration"]["host_clock"]["data"]["host_clock_server"] == (
        "{}:{}".format(*ntp_server)
    )


def test_bad_arguments_are_refused():
    for kwargs in ({"port": 0}, {"timeout": 0}, {"queries": 0}):
        with pytest.raises(ValueError, match="HostClock"):
            HostClock("127.0.0.1", **kwargs)
