"""Raw-socket helpers for emulator tests: a local SNTP server and a hand-written wire reader.

The raw client parses the wire by hand (``Info:`` lines to CRLF, ``Data:`` frames with the
11-byte little-endian header of §4.6) so that conformance tests do not depend on the
emulator's own encoder or on the client decoder.

Every connection opened here (and every writer given to :func:`track`) is closed by the
autouse fixture ``close_raw_connections`` (conftest.py) at the end of its test, so a test
whose meter dropped the connection need not close its end by hand.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

NTP_DELTA = 2_208_988_800
LOG_RE = rb"^Info:\[([ADIWE])\](\d\d/\d\d \d\d:\d\d:\d\d): (.*)$"

_WRITERS: list[asyncio.StreamWriter] = []


def track(writer: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """Have ``writer`` closed at the end of the test (see :func:`close_tracked`)."""
    _WRITERS.append(writer)
    return writer


async def close_tracked() -> None:
    """Close every tracked writer (on the running loop, the test's), waiting for each."""
    while _WRITERS:
        writer = _WRITERS.pop()
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass  # the meter reset it first: closed all the same


class _SntpServer(asyncio.DatagramProtocol):
    """Answers every 48-byte request with the host clock (+ ``offset_s``)."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 48 or self.transport is None:
            return
        self.requests += 1
        now = time.time() + self.offset_s + NTP_DELTA
        secs = int(now)
        frac = int((now - secs) * 2**32)
        reply = bytearray(48)
        reply[0] = 0x24  # LI 0, VN 4, mode 4 (server)
        reply[1] = 1
        reply[24:32] = data[40:48]
        struct.pack_into("!IIII", reply, 32, secs, frac, secs, frac)
        struct.pack_into("!II", reply, 40, secs, frac)
        self.transport.sendto(bytes(reply), addr)


@dataclass
class NtpServer:
    port: int
    protocol: _SntpServer


@dataclass
class Frame:
    length: int
    packet: int
    payload: bytes

    def samples(self, channels: int) -> np.ndarray:
        return np.frombuffer(self.payload, dtype="<f4").reshape(-1, channels)


class RawClient:
    """A TCP client reading the meter's byte stream item by item."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()

    async def _fill(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout}s for {n} bytes, have {bytes(self.buffer[:200])!r}")
            data = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not data:
                raise EOFError(f"connection closed, buffered {bytes(self.buffer[:200])!r}")
            self.buffer += data

    async def read_item(self, timeout: float = 3.0) -> bytes | Frame:
        """One ``Info:`` line (bytes without CRLF) or one ``Data:`` frame."""
        await self._fill(5, timeout)
        head = bytes(self.buffer[:5])
        if head == b"Info:":
            deadline = time.monotonic() + timeout
            while (i := self.buffer.find(b"\r\n")) < 0:
                await self._fill(len(self.buffer) + 1, max(0.01, deadline - time.monotonic()))
            line = bytes(self.buffer[:i])
            del self.buffer[: i + 2]
            return line
        if head == b"Data:":
            await self._fill(11, timeout)
            length, packet = struct.unpack_from("<HI", self.buffer, 5)
            await self._fill(11 + length, timeout)
            payload = bytes(self.buffer[11 : 11 + length])
            del self.buffer[: 11 + length]
            return Frame(length, packet, payload)
        raise AssertionError(f"stream out of sync: {bytes(self.buffer[:60])!r}")

    async def read_line(self, timeout: float = 3.0) -> bytes:
        item = await self.read_item(timeout)
        assert isinstance(item, bytes), f"expected a text line, got a frame {item.packet}"
        return item

    async def read_json(self, timeout: float = 3.0, *, skip_logs: bool = True,
                        skip_frames: bool = False) -> dict[str, Any]:
        """The next ``Info:{...}`` line as a dict (key order kept), skipping log lines."""
        deadline = time.monotonic() + timeout
        while True:
            item = await self.read_item(max(0.01, deadline - time.monotonic()))
            if isinstance(item, Frame):
                if skip_frames:
                    continue
                raise AssertionError(f"unexpected frame {item.packet} while waiting for JSON")
            if item.startswith(b"Info:{"):
                return json.loads(item[5:])
            if not (skip_logs and item.startswith(b"Info:[")):
                raise AssertionError(f"unexpected line {item!r}")

    async def wait_line(self, predicate: Callable[[bytes], bool], timeout: float = 3.0,
                        *, skip_frames: bool = True) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            item = await self.read_item(max(0.01, deadline - time.monotonic()))
            if isinstance(item, bytes) and predicate(item):
                return item
            if isinstance(item, Frame) and not skip_frames:
                raise AssertionError("unexpected frame")

    async def send(self, command: dict[str, Any] | bytes) -> None:
        data = command if isinstance(command, bytes) else json.dumps(command).encode() + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, command: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
        await self.send(command)
        return await self.read_json(timeout)

    async def closed(self, timeout: float = 3.0) -> bool:
        """True if the meter closes the connection (EOF or reset) within ``timeout``."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
                self.buffer += data
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def open_client(port: int, *, read_info: bool = True) -> RawClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, track(writer))
    if read_info:
        info = await client.read_json(timeout=3.0)
        assert info["cmd"] == "info", info
    return client


