"""Failure modes: every one ends in a typed error naming the meter, never a hang."""

from __future__ import annotations

import asyncio
import socket

import pytest

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    MeterClient,
    MeterConnectionError,
    MeterError,
    MeterProtocolError,
    MeterTimeoutError,
)

from .client_fakes import INFO_LINE, FakePeer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_refused_port():
    port = free_port()
    client = AsyncMeterClient("127.0.0.1", port, name="lab-1", timeout=2.0)
    with pytest.raises(MeterConnectionError) as info:
        await client.connect()
    assert str(info.value).startswith(f"smartmeter lab-1 (127.0.0.1:{port}): cannot connect")
    assert info.value.meter == f"smartmeter lab-1 (127.0.0.1:{port})"


async def test_unknown_host():
    client = AsyncMeterClient("no-such-meter.invalid", name="ghost", timeout=2.0)
    with pytest.raises(MeterError, match=r"smartmeter ghost \(no-such-meter.invalid:54321\)"):
        await client.connect()


async def test_fourth_client_rejected(meter):
    clients = []
    try:
        for _ in range(3):
            client = AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0)
            await client.connect()
            clients.append(client)
        fourth = AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0, name="emu")
        with pytest.raises(MeterConnectionError, match="maximum of 3 clients"):
            await fourth.connect()
    finally:
        for client in clients:
            await client.close()


async def test_closed_without_bytes():
    peer = await FakePeer(b"", close_at_once=True).start()
    try:
        with pytest.raises(MeterConnectionError, match="without sending anything"):
            await AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0).connect()
    finally:
        await peer.close()


@pytest.mark.parametrize(
    "greeting",
    [
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        b"\x00\x01\x02\xff" * 40,
        b'Info:{"cmd":"info","type":"powermeter","name":"pm"}\r\n',
    ],
    ids=["http", "binary", "other-device"],
)
async def test_garbage_peer(greeting):
    peer = await FakePeer(greeting).start()
    try:
        client = AsyncMeterClient("127.0.0.1", peer.port, timeout=1.0, name="bogus")
        with pytest.raises(MeterProtocolError, match=r"smartmeter bogus \(127.0.0.1:\d+\)"):
            await client.connect()
        assert not client.connected
    finally:
        await peer.close()


async def test_silent_peer_times_out():
    peer = await FakePeer(b"").start()
    try:
        with pytest.raises(MeterTimeoutError, match="no info line within 0.5 s"):
            await AsyncMeterClient("127.0.0.1", peer.port, timeout=0.5).connect()
    finally:
        await peer.close()


async def test_reply_timeout_names_meter_and_command():
    peer = await FakePeer(INFO_LINE).start()  # answers nothing
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=0.5) as client:
            with pytest.raises(MeterTimeoutError) as info:
                await client.get_voltage()
            assert str(info.value) == (
                f"smartmeter fake (127.0.0.1:{peer.port}): no reply to 'getVoltage' within 0.5 s"
            )
            assert isinstance(info.value, TimeoutError)
    finally:
        await peer.close()


async def test_connection_lost_while_waiting():
    peer = await FakePeer(INFO_LINE).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=3.0, reconnect=False) as c:
            waiting = asyncio.create_task(c.get_energy())
            await asyncio.sleep(0.1)
            await peer.close()
            with pytest.raises(MeterConnectionError, match="'getEnergy'"):
                await asyncio.wait_for(waiting, 2.0)
            assert not c.connected
    finally:
        await peer.close()


async def test_liveness_declares_silent_link_dead():
    peer = await FakePeer(INFO_LINE).start()  # no lifeness lines: a hung meter
    try:
        events = []
        client = AsyncMeterClient(
            "127.0.0.1", peer.port, timeout=1.0, keepalive_s=0.2, liveness_timeout_s=0.6,
            reconnect=False,
        )
        client.subscribe_events(events.append)
        async with client:
            for _ in range(60):
                if events:
                    break
                await asyncio.sleep(0.05)
            assert events and type(events[0]).__name__ == "ConnectionLost"
            assert b"!" in peer.received  # keep-alives were sent, never '?'
            assert b"?" not in peer.received
    finally:
        await peer.close()


def test_sync_facade_refused_leaves_no_thread():
    client = MeterClient("127.0.0.1", free_port(), timeout=1.0, name="lab-2")
    with pytest.raises(MeterConnectionError, match="smartmeter lab-2"):
        client.connect()
    client.close()


async def test_quiet_but_healthy_connection_is_not_declared_dead(meter):
    events = []
    client = AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=2.0, keepalive_s=0.2, liveness_timeout_s=0.6
    )
    client.subscribe_events(events.append)
    async with client:
        await client.set_log_level("warning")  # no lifeness lines any more (§2.6)
        await asyncio.sleep(1.2)
        session = await client.sample(rate=1000, flow_control=True)  # paused: no data (§5.1)
        await asyncio.sleep(1.2)
        assert client.connected and not events
        await session.stop()
