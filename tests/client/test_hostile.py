"""Hostile or broken peers, tried as a user would: each ends in the client's own typed error
naming the meter, within the client's timeout and without unbounded memory."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc

import pytest

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    MeterClient,
    MeterProtocolError,
    MeterTimeoutError,
)
from smartmeter_ophyd.client._transports import EARLY_QUEUE_BYTES, open_tcp_link

from .client_fakes import INFO_LINE, FakePeer, cmd_of

FLOOD_CHUNK = b"x" * (1 << 20)
DEEP_JSON = b'Info:{"cmd":"info","a":' + b"[" * 30_000 + b"]" * 30_000 + b"}\r\n"
"""30 000 levels in 60 kB: within the decoder's 64 KiB line bound, far beyond json's recursion."""


class Flood:
    """A peer that sends ``head`` then megabytes without a newline until the reader stops."""

    def __init__(self, head: bytes, limit: int) -> None:
        self.head = head
        self.limit = limit
        self.sent = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Flood:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.head)
            while self.sent < self.limit:
                writer.write(FLOOD_CHUNK)
                await writer.drain()
                self.sent += len(FLOOD_CHUNK)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_flooded_handshake_fails_fast_with_bounded_memory() -> None:
    """400 MB without a newline once took 263 MB of memory; now the handshake gives up after
    the decoder's bound and the early queue pauses reading."""
    flood = await Flood(b'Info:{"cmd":"info",', 400 << 20).start()
    tracemalloc.start()
    try:
        started = time.monotonic()
        client = AsyncMeterClient("127.0.0.1", flood.port, name="flood", timeout=3.0,
                                  reconnect=False)
        with pytest.raises(MeterProtocolError, match=r"smartmeter flood \(.*no info line in the"):
            await client.connect()
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await flood.close()
    assert took < 1.0, f"gave up after {took:.2f} s, not at once"
    assert peak < 8 << 20, f"peak traced memory {peak / 1e6:.1f} MB"
    assert flood.sent < 64 << 20


async def test_unread_link_pauses_reading() -> None:
    """Before the client attaches (the handshake reads at its own pace), at most
    EARLY_QUEUE_BYTES plus one read are queued; the peer is pushed back by TCP."""
    flood = await Flood(b"", 400 << 20).start()
    tracemalloc.start()
    try:
        link = await open_tcp_link("127.0.0.1", flood.port)
        await asyncio.sleep(0.5)  # nobody reads the link meanwhile
        _, peak = tracemalloc.get_traced_memory()
        first = await link.read()
        link.abort()
        await link.wait_closed()
    finally:
        tracemalloc.stop()
        await flood.close()
    assert first == b"x" * len(first)
    assert peak < EARLY_QUEUE_BYTES + (4 << 20), f"peak traced memory {peak / 1e6:.1f} MB"
    assert flood.sent < 64 << 20, f"the peer pushed {flood.sent / 1e6:.0f} MB into an unread link"


async def test_deep_json_info_line_is_a_protocol_error() -> None:
    peer = await FakePeer(DEEP_JSON).start()
    try:
        client = AsyncMeterClient("127.0.0.1", peer.port, name="deep", timeout=2.0,
                                  reconnect=False)
        with pytest.raises(MeterProtocolError, match=r"smartmeter deep .*nested \d+ levels"):
            await client.connect()
        assert not client.connected
    finally:
        await peer.close()


async def test_deep_json_reply_fails_the_request_and_the_connection_survives() -> None:
    voltage = b'Info:{"error":false,"cmd":"getVoltage","voltage":[230.1,229.8,231.0],"unit":"V"}\r\n'
    calls: list[bytes] = []

    def answer(line: bytes) -> list[bytes]:
        calls.append(line)
        return [DEEP_JSON.replace(b'"info"', b'"getVoltage"')] if len(calls) == 1 else [voltage]

    peer = await FakePeer(INFO_LINE, answer).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0) as client:
            with pytest.raises(MeterProtocolError, match=r"smartmeter fake .*'getVoltage'.*nested"):
                await client.get_voltage()
            assert client.connected
            assert (await client.get_voltage()).values == (230.1, 229.8, 231.0)
            assert [cmd_of(c) for c in calls] == ["getVoltage", "getVoltage"]
    finally:
        await peer.close()


def test_blocking_connect_raises_the_clients_own_timeout() -> None:
    """The facade's wait (3 x timeout + 1 s) must not replace the client's own error."""
    with socket.socket() as silent:  # accepts (kernel backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        client = MeterClient("127.0.0.1", port, timeout=0.5, reconnect=False, name="mute")
        started = time.monotonic()
        try:
            with pytest.raises(MeterTimeoutError) as info:
                client.connect()
        finally:
            client.close()
    took = time.monotonic() - started
    assert str(info.value) == (
        f"smartmeter mute (127.0.0.1:{port}): connected but no info line within 0.5 s"
    )
    assert took < 1.5, f"raised after {took:.2f} s, not at the client's 0.5 s"
