"""Byte carriers for the client: TCP, USB serial (pty), UDP datagrams.

These classes only move bytes; decoding stays in :mod:`smartmeter_ophyd.protocol` and the
request/session logic in :mod:`._async`.  A *link* is a duplex byte stream with an
``asyncio.StreamReader`` for input and ``write``/``drain``/``close`` for output, whatever
carries it:

* :func:`open_tcp_link` -- the command connection (TCP 54321, or 54322 for raw streams).
* :func:`open_serial_link` -- a serial device (the emulator's pty or the real USB port,
  2,000,000 baud) opened with pyserial in raw mode and read with the event loop.
* :class:`UdpReceiver` -- a bound UDP socket that accepts datagrams only from the meter's
  address and hands them to a callback (§4.13).

Limits: serial writes are small command lines; a full pty buffer is retried from the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class Link:
    """A duplex byte stream: ``reader`` for input, ``write``/``drain``/``close`` for output."""

    kind = "link"

    def __init__(self, reader: asyncio.StreamReader, peer_host: str, local_host: str) -> None:
        self.reader = reader
        self.peer_host = peer_host
        self.local_host = local_host

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Close at once, discarding unsent bytes (used when the peer seems dead)."""
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        return None

    @property
    def is_closing(self) -> bool:
        raise NotImplementedError


class TcpLink(Link):
    kind = "tcp"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        local = writer.get_extra_info("sockname") or ("?", 0)
        super().__init__(reader, str(peer[0]), str(local[0]))
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()

    @property
    def is_closing(self) -> bool:
        return self.writer.is_closing()


async def open_tcp_link(host: str, port: int, *, read_limit: int = 1 << 22) -> TcpLink:
    reader, writer = await asyncio.open_connection(host, port, limit=read_limit)
    return TcpLink(reader, writer)


class SerialLink(Link):
    """A serial device read through the event loop (``add_reader``), written directly."""

    kind = "serial"

    def __init__(self, device: Any, loop: asyncio.AbstractEventLoop, path: str) -> None:
        reader = asyncio.StreamReader(limit=1 << 22, loop=loop)
        super().__init__(reader, path, "serial")
        self._device = device
        self._fd: int = device.fileno()
        self._loop = loop
        self._closed = False
        self._pending = bytearray()
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: the other side of the pty closed (the emulator went away).
            if exc.errno != errno.EIO:
                logger.warning("serial %s read failed: %s", self.peer_host, exc)
            data = b""
        if data:
            self.reader.feed_data(data)
        else:
            self._loop.remove_reader(self._fd)
            self.reader.feed_eof()

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError(f"serial {self.peer_host} is closed")
        self._pending += data
        self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                written = os.write(self._fd, self._pending)
            except BlockingIOError:
                self._loop.call_later(0.005, self._flush)
                return
            del self._pending[:written]

    async def drain(self) -> None:
        while self._pending and not self._closed:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(Exception):
            self._device.close()
        if not self.reader.at_eof():
            self.reader.feed_eof()

    @property
    def is_closing(self) -> bool:
        return self._closed


async def open_serial_link(path: str, baudrate: int = 2_000_000) -> SerialLink:
    import serial  # pyserial; imported lazily so TCP-only users do not need it

    device = serial.Serial()
    device.port = path
    device.baudrate = baudrate
    device.timeout = 0
    device.write_timeout = 0
    device.open()
    return SerialLink(device, asyncio.get_running_loop(), path)


class UdpReceiver(asyncio.DatagramProtocol):
    """Receives the meter's sample datagrams (§4.13).

    Datagrams from any address other than ``meter_host`` are counted and ignored (the meter
    sends from its own IP).  Until :meth:`attach` the datagrams are kept in order so that
    data racing ahead of the TCP ``sample`` reply is not lost.
    """

    def __init__(self, meter_label: str, meter_host: str) -> None:
        self.meter_label = meter_label
        self.meter_host = meter_host
        self.transport: asyncio.DatagramTransport | None = None
        self.foreign_datagrams = 0
        self.datagrams = 0
        self._early: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self.last_datagram_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if addr[0] != self.meter_host:
            self.foreign_datagrams += 1
            if self.foreign_datagrams == 1 or self.foreign_datagrams % 1000 == 0:
                logger.warning(
                    "%s: ignoring %d datagram(s) from %s, not the meter (%s)",
                    self.meter_label,
                    self.foreign_datagrams,
                    addr[0],
                    self.meter_host,
                )
            return
        self.datagrams += 1
        self.last_datagram_at = asyncio.get_running_loop().time()
        if self._sink is None:
            self._early.append(data)
        else:
            self._sink(data)

    def error_received(self, exc: Exception) -> None:
        logger.warning("%s: UDP error: %s", self.meter_label, exc)

    def attach(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for data in early:
            sink(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_udp_receiver(
    meter_label: str, meter_host: str, local_host: str, port: int
) -> UdpReceiver:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: UdpReceiver(meter_label, meter_host), local_addr=(local_host, port)
    )
    return protocol
