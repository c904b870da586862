"""Byte carriers for the client: TCP, USB serial (pty), UDP datagrams.

These classes only move bytes; decoding stays in :mod:`smartmeter_ophyd.protocol` and the
request/session logic in :mod:`._async`.  A *link* is a duplex byte stream: input is pushed
to a sink (or queued for :meth:`Link.read` until one is attached, at most
:data:`EARLY_QUEUE_BYTES` before reading pauses), output goes through ``write``/``close``:

* :func:`open_tcp_link` -- the command connection (TCP 54321, or 54322 for raw streams),
  read with ``recv_into`` a reused buffer (no allocation per read).  Its receive low-water
  mark (``SO_RCVLOWAT``) can be raised so that the event loop wakes once per batch of bytes
  instead of once per TCP segment (see :meth:`Link.set_receive_low_water`), and
  :meth:`Link.read_now` lets the loop's shared timer read it directly (batched sessions).
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
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


READ_BUFFER_BYTES = 1 << 18
"""Receive buffer reused for every read (``recv_into``, no per-read allocation)."""
EARLY_QUEUE_BYTES = READ_BUFFER_BYTES
"""Before :meth:`Link.attach`, reading pauses once this much is queued (a peer flooding the
handshake cannot grow memory; the kernel's buffers then push back on it)."""


class Link:
    """A duplex byte stream.

    Input is pushed: before :meth:`attach` the chunks queue up and :meth:`read` returns them
    (the connect handshake); after it, every chunk goes straight to the sink, which must
    consume it during the call (it may be a view of a reused buffer).  ``b""`` = closed.
    """

    kind = "link"

    def __init__(self, peer_host: str, local_host: str) -> None:
        self.peer_host = peer_host
        self.local_host = local_host
        self.error: BaseException | None = None
        self._early: deque[bytes] = deque()
        self._early_bytes = 0
        self._early_paused = False
        self._eof = False
        self._sink: Callable[[bytes | memoryview], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- called by the carrier
    def _data(self, data: bytes | memoryview) -> None:
        if self._sink is not None:
            self._sink(data)
        else:
            self._early.append(bytes(data))
            self._early_bytes += len(data)
            if self._early_bytes > EARLY_QUEUE_BYTES and not self._early_paused:
                self._early_paused = True
                self.pause_reading()
            self._wake()

    def _lost(self, exc: BaseException | None) -> None:
        if self._eof:
            return
        self._eof = True
        self.error = exc
        if self._sink is not None:
            self._sink(b"")
        else:
            self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by the client
    async def read(self) -> bytes:
        """The next chunk (only before :meth:`attach`); ``b""`` once the peer closed."""
        while not self._early and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self._early:
            chunk = self._early.popleft()
            self._early_bytes -= len(chunk)
            if self._early_paused and self._early_bytes <= EARLY_QUEUE_BYTES // 2:
                self._early_paused = False
                self.resume_reading()
            return chunk
        if self.error is not None and not isinstance(self.error, EOFError):
            raise ConnectionError(str(self.error)) from self.error
        return b""

    def attach(self, sink: Callable[[bytes | memoryview], None]) -> None:
        """From now on push every chunk (and the final ``b""``) to ``sink``."""
        self._sink = sink
        while self._early:
            sink(self._early.popleft())
        self._early_bytes = 0
        if self._early_paused:
            self._early_paused = False
            self.resume_reading()
        if self._eof:
            sink(b"")

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Close at once, discarding unsent bytes (used when the peer seems dead)."""
        self.close()

    @property
    def receive_low_water(self) -> int:
        """Bytes the kernel gathers before the loop is woken (1: every arrival)."""
        return 1

    def set_receive_low_water(self, nbytes: int) -> bool:
        """Ask to be woken only once ``nbytes`` are readable; False if the carrier cannot.

        Setting it back to 1 wakes the loop at once if any byte is waiting.
        """
        return nbytes <= 1

    def read_now(self) -> int | None:
        """Read what is waiting now, without the event loop's readiness callback, and push
        it to the sink; the bytes read, or None if this carrier cannot (then nothing is
        batched on it).  EOF and errors are left to the carrier's own read path."""
        return None

    def close(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    @property
    def is_closing(self) -> bool:
        raise NotImplementedError


class _TcpProtocol(asyncio.BufferedProtocol):
    """Reads with ``recv_into`` a reused buffer and pushes views of it to the link."""

    def __init__(self, on_link: Callable[[TcpLink], None] | None = None) -> None:
        self.link: TcpLink | None = None
        self._on_link = on_link
        self._buffer = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.link = TcpLink(self)
        if self._on_link is not None:
            self._on_link(self.link)

    @property
    def buffer(self) -> memoryview:
        """The read buffer (reused by every read; its bytes are consumed during the push)."""
        return self._view

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        assert self.link is not None
        self.link._data(self._view[:nbytes])

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link._lost(exc)


class TcpLink(Link):
    kind = "tcp"

    def __init__(self, protocol: _TcpProtocol) -> None:
        transport = protocol.transport
        assert transport is not None
        peer = transport.get_extra_info("peername") or ("?", 0)
        local = transport.get_extra_info("sockname") or ("?", 0)
        super().__init__(str(peer[0]), str(local[0]))
        self.transport = transport
        self.peer_port = int(peer[1])
        self._socket: Any = transport.get_extra_info("socket")  # asyncio TransportSocket
        self._low_water = 1
        self._protocol = protocol
        self._reader: socket.socket | None = None
        """A duplicate of the socket's descriptor for :meth:`read_now` (asyncio's own socket
        object refuses reads); opened on first use, closed with the link."""

    @property
    def receive_low_water(self) -> int:
        return self._low_water

    def set_receive_low_water(self, nbytes: int) -> bool:
        # Linux's epoll honours SO_RCVLOWAT for TCP readability, and lowering it signals
        # readability at once if bytes are waiting; a non-blocking recv still returns fewer
        # bytes than the mark, so EOF and errors are never held back.
        nbytes = max(1, nbytes)
        if nbytes == self._low_water:
            return True
        sock = self._socket
        if sock is None or self.transport.is_closing():
            if nbytes > 1:
                return False
            self._low_water = 1  # nothing more will be read anyway
            return True
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except (OSError, AttributeError) as exc:
            logger.debug("SO_RCVLOWAT %d not accepted: %s", nbytes, exc)
            return nbytes <= 1
        self._low_water = nbytes
        return True

    def read_now(self) -> int | None:
        """One ``recv_into`` the protocol's read buffer, now (the read batcher's shared tick
        reads every batched meter this way in one loop callback).  The transport's own
        reader stays registered: it still sees EOF and errors (the kernel reports them
        whatever the mark), and bytes if the tick is late; both read the same socket in
        stream order on the loop's one thread."""
        if self.transport.is_closing() or self._eof or self._sink is None:
            return 0
        reader = self._reader
        if reader is None:
            sock = self._socket
            if sock is None:
                return None
            fd = -1
            try:
                fd = os.dup(sock.fileno())
                reader = self._reader = socket.socket(fileno=fd)
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                logger.debug("no duplicate descriptor for direct reads: %s", exc)
                return None
            reader.setblocking(False)
        view = self._protocol.buffer
        try:
            nbytes = reader.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:  # the transport may never see it: report it here
            self._lost(exc)
            self.transport.abort()
            return 0
        if nbytes:  # 0 is EOF: the transport's reader reports it
            self._data(view[:nbytes])
        return nbytes

    def _lost(self, exc: BaseException | None) -> None:
        self._close_reader()
        super()._lost(exc)

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        self._close_reader()
        self.transport.abort()

    def close(self) -> None:
        self._close_reader()
        self.transport.close()

    @property
    def is_closing(self) -> bool:
        return self.transport.is_closing()


async def serve_tcp_links(
    on_link: Callable[[TcpLink], None], host: str, port: int
) -> asyncio.Server:
    """Listen on ``host:port``; every accepted connection is handed over as a link."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _TcpProtocol(on_link), host, port)


async def open_tcp_link(host: str, port: int) -> TcpLink:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_TcpProtocol, host, port)
    assert protocol.link is not None
    return protocol.link


class SerialLink(Link):
    """A serial device read through the event loop (``add_reader``), written directly."""

    kind = "serial"

    def __init__(self, device: Any, loop: asyncio.AbstractEventLoop, path: str) -> None:
        super().__init__(path, "serial")
        self._device = device
        self._fd: int = device.fileno()
        self._loop = loop
        self._closed = False
        self._pending = bytearray()
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        error: BaseException | None = None
        try:
            data = os.read(self._fd, READ_BUFFER_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: the other side of the pty closed (the emulator went away).
            if exc.errno != errno.EIO:
                logger.warning("serial %s read failed: %s", self.peer_host, exc)
                error = exc
            data = b""
        if data:
            self._data(data)
        else:
            self._loop.remove_reader(self._fd)
            self._lost(error)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionResetError(f"serial {self.peer_host} is closed")
        self._pending += data
        self._flush()

    def _flush(self) -> None:
        while self._pending and not self._closed:
            try:
                written = os.write(self._fd, self._pending)
            except BlockingIOError:
                self._loop.call_later(0.005, self._flush)
                return
            del self._pending[:written]

    def pause_reading(self) -> None:
        if not self._closed:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(Exception):
            self._device.close()
        self._lost(None)

    @property
    def is_closing(self) -> bool:
        return self._closed


async def open_serial_link(path: str, baudrate: int = 2_000_000) -> SerialLink:
    import serial  # type: ignore[import-untyped]  # pyserial, only needed for serial links

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
