"""EmulatorFleet over real sockets: lifecycle, its SNTP responder, per-meter clocks and network."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.protocol import client_request, offset_and_delay, parse_server_reply

from .emulator_wire import open_client
from .test_conformance_sampling import collect, stop_and_drain

CONF = re.compile(rb"NTP synced with conf: (\d+)")
SLACK_MS = 5
"""Event-loop latency an SNTP round trip may add on a loaded 2-core host (observed up to 6 ms
of round trip, i.e. 3 ms of confidence)."""


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _sntp_offset(address: tuple[str, int]) -> tuple[float, float]:
    """One SNTP exchange as a host client makes it: (offset, delay) in seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sent = time.time()
        sock.sendto(client_request(sent), address)
        data = sock.recv(512)
        received = time.time()
    reply = parse_server_reply(data, sent)
    return offset_and_delay(sent, reply.receive, reply.transmit, received)


def _best_sntp_offset(address: tuple[str, int], tries: int = 8) -> tuple[float, float]:
    """The exchange with the shortest round trip of ``tries``, as NTP clients choose: its
    offset is off the truth by at most half its delay, whatever the path's asymmetry."""
    return min((_sntp_offset(address) for _ in range(tries)), key=lambda pair: pair[1])


@pytest.fixture
def fleet3() -> Iterator[EmulatorFleet]:
    """3 meters off by -500/0/+500 ms with drifts -50/0/+50 ppm; the last 20 ms from NTP."""
    with EmulatorFleet(
        [
            {"clock_offset_s": -0.5, "drift_ppm": -50.0},
            {},
            {"clock_offset_s": 0.5, "drift_ppm": 50.0, "network_delay_s": 0.02},
        ],
        name_prefix="fleet",
    ) as fleet:
        yield fleet


async def _conf_after_ntp(port: int) -> int:
    """Send ``{"cmd": "ntp"}`` and return the confidence the meter logs (§6.2)."""
    c = await open_client(port)
    try:
        await c.send({"cmd": "ntp"})
        line = await c.wait_line(lambda b: CONF.search(b) is not None)
        match = CONF.search(line)
        assert match is not None
        return int(match.group(1))
    finally:
        await c.close()


async def _start_ts_minus_true_start(port: int, fleet: EmulatorFleet, i: int) -> float:
    """Start a 1 kHz session: the meter's reported ``startTs`` minus the true start instant."""
    c = await open_client(port)
    try:
        sent = time.time()
        reply = await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
        received = time.time()
        start_ts = float(reply["startTs"])
        truth = fleet.truth(i)
        assert sent - 0.001 <= truth.true_start <= received + 0.001
        await stop_and_drain(c)
        return start_ts - truth.true_start
    finally:
        await c.close()


def test_start_close_leaves_no_threads_or_sockets() -> None:
    """close() ends the loop thread and closes every socket the fleet opened."""
    threads, fds = set(threading.enumerate()), _open_fds()
    fleet = EmulatorFleet(2)
    fleet.start()
    assert fleet.names == ["meter1", "meter2"]
    assert len(set(threading.enumerate()) - threads) == 1
    for host, port in fleet.addresses:
        with socket.create_connection((host, port), timeout=2) as s:
            assert s.recv(4096).startswith(b'Info:{"cmd":"info"')
    addresses = fleet.addresses + [a for a in fleet.control_addresses if a is not None]
    with pytest.raises(RuntimeError, match="already started"):
        fleet.start()
    fleet.close()
    fleet.close()
    assert set(threading.enumerate()) - threads == set()
    assert _open_fds() <= fds
    for address in addresses:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
    with pytest.raises(RuntimeError, match="not running"):
        fleet.clock_error_s(0)


def test_bad_settings_are_refused_naming_the_meter() -> None:
    with pytest.raises(ValueError, match=r"meter 1 \(meter2\): unknown settings \['offset'\]"):
        EmulatorFleet([{}, {"offset": 1.0}])
    with pytest.raises(ValueError, match="at least one meter"):
        EmulatorFleet([])


def test_sntp_responder_serves_the_configured_offset() -> None:
    """A host SNTP client measures the responder's offset to within half the round trip
    (1 ms here unless the host is loaded), also after a change."""
    stamps = 1e-6  # NTP's and time.time()'s rounding
    with EmulatorFleet(1, time_offset_s=0.3) as fleet:
        offset, delay = _best_sntp_offset(fleet.sntp_address)
        assert 0 <= delay < 0.01
        assert abs(offset - 0.3) <= delay / 2 + stamps, (offset, delay)
        fleet.time_offset_s = -0.3
        offset, delay = _best_sntp_offset(fleet.sntp_address)
        assert abs(offset + 0.3) <= delay / 2 + stamps, (offset, delay)
        assert fleet.time_offset_s == -0.3


async def test_per_meter_clock_offsets_survive_boot(fleet3: EmulatorFleet) -> None:
    """-500/0/+500 ms after start, as the meters' own startTs shows; drift reaches the clock;
    the next NTP sync sets each clock right again."""
    for i, expected in enumerate((-0.5, 0.0, 0.5)):
        error = await _start_ts_minus_true_start(fleet3.ports[i], fleet3, i)
        # stepped meters: exact up to startTs's ms; the middle one: its boot NTP's error
        assert abs(error - expected) < (0.002 if expected else SLACK_MS / 1000), (i, error)
        assert fleet3.truth(i).drift_ppm == (-50.0, 0.0, 50.0)[i]
    assert await _conf_after_ntp(fleet3.ports[0]) <= SLACK_MS  # default: 0.5 ms each way
    assert abs(await _start_ts_minus_true_start(fleet3.ports[0], fleet3, 0)) < SLACK_MS / 1000


async def test_network_delay_sets_the_ntp_confidence(fleet3: EmulatorFleet) -> None:
    """20 ms one-way delay to the time server: the meter logs ``NTP synced with conf: 20``;
    set_network at run time changes it."""
    # half the round trip, truncated to ms, plus the loops' own latency
    assert 20 <= await _conf_after_ntp(fleet3.ports[2]) <= 20 + SLACK_MS
    assert fleet3.set_network(2, delay_s=0.005) == (0.005, 0.0)
    assert 5 <= await _conf_after_ntp(fleet3.ports[2]) <= 5 + SLACK_MS
    assert await _conf_after_ntp(fleet3.ports[1]) <= SLACK_MS
    with pytest.raises(ValueError, match="smartmeter fleet3: network delay -1"):
        fleet3.set_network("fleet3", delay_s=-1)


async def test_step_clock_moves_the_reported_time(fleet3: EmulatorFleet) -> None:
    """A clock step shows in the meter's own startTs by the step (ms resolution)."""
    before = await _start_ts_minus_true_start(fleet3.ports[1], fleet3, 1)
    error = fleet3.step_clock(1, 0.25)
    assert abs(error - fleet3.clock_error_s(1)) < 1e-4
    after = await _start_ts_minus_true_start(fleet3.ports[1], fleet3, 1)
    assert abs(after - before - 0.25) < 0.002


async def test_own_time_server_keeps_a_meter_off_across_syncs() -> None:
    """``time_server_offset_s``: every NTP sync leaves that meter off by the server's offset."""
    with EmulatorFleet([{}, {"time_server_offset_s": 0.3}]) as fleet:
        assert await _conf_after_ntp(fleet.ports[1]) <= SLACK_MS
        error = await _start_ts_minus_true_start(fleet.ports[1], fleet, 1)
        assert abs(error - 0.3) < SLACK_MS / 1000
        assert abs(await _start_ts_minus_true_start(fleet.ports[0], fleet, 0)) < SLACK_MS / 1000


async def test_inject_reaches_the_meter() -> None:
    """inject() runs the control channel's faults; an unknown fault is refused by name."""
    with EmulatorFleet(1) as fleet:
        c = await open_client(fleet.ports[0])
        fleet.inject(0, "drop_connections")
        assert await c.closed(timeout=2.0)
        with pytest.raises(ValueError, match="unknown fault 'explode'"):
            fleet.inject("meter1", "explode")
        with pytest.raises(KeyError, match="no emulated meter named 'meter9'"):
            fleet.inject("meter9", "reboot")


async def test_ntp_history_and_rtc_fillers() -> None:
    """Ground truth from the fleet: each sync's confidence and true error; the RTC fillers of
    a slow ADE crystal (§4.10) are the rows the client receives repeated."""
    with EmulatorFleet(
        [{"network_delay_s": 0.02}, {"time_server_offset_s": 0.3}, {"ade_drift_ppm": -300.0}]
    ) as fleet:
        (boot,) = fleet.ntp_history(0)
        assert 20 <= boot.confidence_ms <= 20 + SLACK_MS
        assert abs(boot.error_s) < SLACK_MS / 1000  # half the asymmetry of the round trip
        assert 20 <= await _conf_after_ntp(fleet.ports[0]) <= 20 + SLACK_MS
        assert [h.true_time > boot.true_time for h in fleet.ntp_history(0)] == [False, True]
        assert abs(fleet.ntp_history(1)[-1].error_s - 0.3) < SLACK_MS / 1000
        c = await open_client(fleet.ports[2])
        await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000}})
        frames, _ = await collect(c, 1.7)  # RTC edges at 0.5 s and 1.5 s: one full second
        tail, _ = await stop_and_drain(c)
        await c.close()
        received = np.concatenate([f.samples(6) for f in frames + tail])
        repeated = np.flatnonzero(np.all(received[1:] == received[:-1], axis=1)) + 1
        fillers = fleet.corrections(2).fillers
        assert 2 <= len(fillers) <= 3  # 8000 Hz * 300 ppm = 2.4 samples missing per RTC second
        assert fillers.tolist() == repeated.tolist()
        times = fleet.sample_times(2, int(fillers[0]) - 1, int(fillers[-1]) + 1)
        assert times.kinds.tolist() == [0] + [2] * len(fillers)
        assert fleet.session_truth(2).ade_drift_ppm == -300.0
