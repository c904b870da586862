"""Meter clock arithmetic and the real SNTP client (§6.2) against local servers."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smartmeter_ophyd.emulator._clock import MeterClock, NetworkModel, sntp_sync, split_ms
from smartmeter_ophyd.protocol import FIRMWARE_SNTP_REQUEST, NTP_UNIX_EPOCH_DELTA

CHRONYD = shutil.which("chronyd") or ("/usr/sbin/chronyd" if Path("/usr/sbin/chronyd").exists() else None)


# ----------------------------------------------------------------------------- clock maths


def test_clock_offset_drift_and_inverse() -> None:
    clock = MeterClock(offset_s=2.5, drift_ppm=100.0, anchor_true=1_000.0)
    assert clock.meter_time(1_000.0) == pytest.approx(1_002.5)
    assert clock.offset_at(1_000.0) == pytest.approx(2.5)
    # 100 ppm fast: 10 000 s later the meter is 1 s further ahead.
    assert clock.offset_at(11_000.0) == pytest.approx(3.5, abs=1e-9)
    assert clock.meter_time(11_000.0) - clock.meter_time(1_000.0) == pytest.approx(10_001.0)
    for t in (0.0, 1_234.5, 1e9):
        assert clock.true_time_of(clock.meter_time(t)) == pytest.approx(t, abs=1e-6)
    assert not clock.synced


def test_step_to_keeps_drifting() -> None:
    clock = MeterClock(offset_s=-7.0, drift_ppm=-50.0, anchor_true=0.0)
    clock.step_to(500.0, at_true=500.0)
    assert clock.synced
    assert clock.offset_at(500.0) == pytest.approx(0.0)
    assert clock.offset_at(20_500.0) == pytest.approx(-1.0, abs=1e-9)


def test_now_follows_the_true_time_source() -> None:
    source = [100.0]
    clock = MeterClock(offset_s=0.25, drift_ppm=0.0, true_time=lambda: source[0])
    assert clock.now() == pytest.approx(100.25)
    source[0] = 160.0
    assert clock.true_now() == 160.0
    assert clock.now() == pytest.approx(160.25)


def test_network_model_is_reproducible_and_non_negative() -> None:
    a = NetworkModel(delay_s=0.001, jitter_s=0.01, seed=4)
    b = NetworkModel(delay_s=0.001, jitter_s=0.01, seed=4)
    draws_a = [a.one_way() for _ in range(200)]
    assert draws_a == [b.one_way() for _ in range(200)]
    assert min(draws_a) >= 0.0
    assert len(set(draws_a)) > 100
    assert NetworkModel(delay_s=0.005).one_way() == 0.005
    with pytest.raises(ValueError, match="delay"):
        NetworkModel(delay_s=-1.0)


# ------------------------------------------------------------------------- a tiny server


def _ntp_timestamp(unix: float) -> bytes:
    ntp = unix + NTP_UNIX_EPOCH_DELTA
    seconds = int(ntp)
    return struct.pack("!II", seconds, int((ntp - seconds) * 2**32))


@dataclass
class TinySntpServer(asyncio.DatagramProtocol):
    """Answers SNTP requests with ``clock()`` (default: host time), records the requests."""

    clock: Callable[[], float] = time.time
    silent: bool = False
    requests: list[bytes] = field(default_factory=list)
    transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests.append(data)
        if self.silent or self.transport is None:
            return
        now = _ntp_timestamp(self.clock())
        reply = (
            bytes([0x24, 2, 6, 0xEC])  # LI 0, VN 4, mode 4 (server), stratum 2
            + bytes(8)
            + b"LOCL"
            + now  # reference
            + data[40:48]  # originate = client's transmit
            + now  # receive
            + now  # transmit
        )
        self.transport.sendto(reply, addr)


@pytest.fixture
async def sntp_server() -> AsyncIterator[tuple[TinySntpServer, int]]:
    loop = asyncio.get_running_loop()
    server = TinySntpServer()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield server, port
    transport.close()


# ----------------------------------------------------------------------------- SNTP tests


async def test_symmetric_delay_gives_confidence_and_correct_time(sntp_server) -> None:
    server, port = sntp_server
    clock = MeterClock(offset_s=2.5, drift_ppm=30.0)
    result = await sntp_sync(clock, "127.0.0.1", port, network=NetworkModel(delay_s=0.005))
    assert result is not None
    assert server.requests and server.requests[0] == FIRMWARE_SNTP_REQUEST  # §6.2, 0xE3 first
    assert result.confidence_ms == int(result.rtt_s * 1000 / 2)
    assert 0.010 <= result.rtt_s
    if result.rtt_s < 0.012:  # not disturbed by a busy host
        assert result.confidence_ms == 5
    assert abs(result.error_s) < 0.0015 + (result.rtt_s - 0.010) / 2
    assert clock.synced
    assert clock.now() - time.time() == pytest.approx(result.error_s, abs=0.0015)
    assert time.time() - 0.5 < result.true_time <= time.time()
    assert clock.offset_at(result.true_time) == pytest.approx(result.error_s, abs=1e-9)


async def test_asymmetric_jitter_error_is_half_the_leg_difference(sntp_server) -> None:
    server, port = sntp_server
    for seed in (1, 2, 3):
        network = NetworkModel(delay_s=0.02, jitter_s=0.015, seed=seed)
        replay = NetworkModel(delay_s=0.02, jitter_s=0.015, seed=seed)
        forth, back = replay.one_way(), replay.one_way()
        clock = MeterClock(offset_s=-30.0, drift_ppm=0.0)
        result = await sntp_sync(clock, "127.0.0.1", port, network=network)
        assert result is not None
        # Meter time = server time + rtt/2 while true time = server time + back:
        # the clock ends up (forth - back) / 2 ahead.  A busy host can oversleep a leg;
        # that lengthens the round trip and moves the error by at most half the excess.
        excess = result.rtt_s - (forth + back)
        assert -0.0005 <= excess < 0.05
        assert abs(result.error_s - (forth - back) / 2) <= excess / 2 + 0.0015
        assert clock.offset_at(clock.true_now()) == pytest.approx(result.error_s, abs=1e-4)
        assert clock.now() - time.time() == pytest.approx(result.error_s, abs=0.001)
        assert result.confidence_ms == int(result.rtt_s * 1000 / 2)


async def test_timeout_leaves_the_clock_alone(sntp_server) -> None:
    server, port = sntp_server
    server.silent = True
    clock = MeterClock(offset_s=1.0)
    before = clock.offset_at(1e9)
    started = time.monotonic()
    assert await sntp_sync(clock, "127.0.0.1", port) is None
    assert 0.19 <= time.monotonic() - started < 1.0
    assert clock.offset_at(1e9) == before and not clock.synced


async def test_slow_network_exceeds_the_200_ms_window(sntp_server) -> None:
    _, port = sntp_server
    clock = MeterClock()
    assert await sntp_sync(clock, "127.0.0.1", port, network=NetworkModel(delay_s=0.11)) is None
    assert not clock.synced


async def test_times_outside_2018_to_2100_are_rejected(sntp_server) -> None:
    server, port = sntp_server
    server.clock = lambda: 1_262_304_000.0  # 2010-01-01
    clock = MeterClock()
    assert await sntp_sync(clock, "127.0.0.1", port) is None
    assert not clock.synced


async def test_short_or_garbled_replies_are_refused(sntp_server) -> None:
    clock = MeterClock()

    class Short(TinySntpServer):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(b"\x24" * 20, addr)

    loop = asyncio.get_running_loop()
    short = Short()
    transport, _ = await loop.create_datagram_endpoint(lambda: short, local_addr=("127.0.0.1", 0))
    try:
        assert await sntp_sync(clock, "127.0.0.1", transport.get_extra_info("sockname")[1]) is None
    finally:
        transport.close()
    assert not clock.synced


def test_split_ms_carries_into_the_next_second() -> None:
    assert split_ms(1_750_000_000.9996) == (1_750_000_001, 0)
    assert split_ms(1_750_000_000.9994) == (1_750_000_000, 999)
    assert split_ms(1_750_000_000.0004) == (1_750_000_000, 0)
    assert split_ms(1_750_000_000.1234) == (1_750_000_000, 123)


async def test_unresolvable_server_returns_none() -> None:
    clock = MeterClock()
    assert await sntp_sync(clock, "no-such-host.invalid", 123) is None
    assert not clock.synced


# ---------------------------------------------------------------------- a real chronyd


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(CHRONYD is None, reason="chronyd is not installed (apt-get install chrony)")
async def test_sync_against_a_real_chronyd(tmp_path: Path) -> None:
    assert CHRONYD is not None
    port = _free_udp_port()
    conf = tmp_path / "chrony.conf"
    conf.write_text(
        "\n".join([
            f"port {port}",
            "local stratum 8",
            "allow 127.0.0.1",
            "bindaddress 127.0.0.1",
            "cmdport 0",
            f"pidfile {tmp_path / 'chronyd.pid'}",
            f"driftfile {tmp_path / 'chrony.drift'}",
            "",
        ])
    )
    proc = subprocess.Popen(
        [CHRONYD, "-f", str(conf), "-x", "-d"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        result = None
        deadline = time.monotonic() + 15.0
        while result is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"chronyd exited with {proc.returncode}: {output}")
            clock = MeterClock(offset_s=-3.0, drift_ppm=20.0)
            result = await sntp_sync(clock, "127.0.0.1", port, network=NetworkModel(delay_s=0.004))
            if result is None:
                await asyncio.sleep(0.25)
        assert result is not None, "chronyd never answered"
        # 2 x 4 ms emulated plus chronyd's own turnaround (longer on a busy host).
        assert result.rtt_s >= 0.008
        assert result.confidence_ms == int(result.rtt_s * 1000 / 2) >= 4
        assert abs(result.error_s) < 0.0015 + (result.rtt_s - 0.008) / 2
        assert clock.now() - time.time() == pytest.approx(result.error_s, abs=0.001)
        assert abs(result.server_time - time.time()) < 1.0
    finally:
        proc.kill()
        proc.wait(timeout=5)
        if proc.stdout:
            proc.stdout.close()
