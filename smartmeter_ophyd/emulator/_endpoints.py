"""The meter's connections: TCP command clients, the USB serial port (a pty), raw stream clients.

An endpoint is something the firmware can write text and frames to and (for command
endpoints) read command lines from.  Reading happens in the background into a line queue;
the meter's main loop consumes one line per endpoint per pass, like the firmware (§2.2).
Writes never block: a TCP endpoint reports its unsent backlog so the sampling loop can hold
data back in the ring buffer instead of queueing it without bound (the ESP blocks in send).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import time
import tty
from collections.abc import Callable
from typing import Final

from smartmeter_ophyd.protocol import LogLevel

logger = logging.getLogger(__name__)

READ_TIMEOUT_S: Final = 10.0
"""A command line without ``\\n`` is taken as-is after the 10 s stream timeout (§2.1)."""
SEND_BUFFER_BYTES: Final = 32_768
"""SO_SNDBUF for accepted sockets: the ESP's TCP window is small, so a slow reader is felt soon."""


class Endpoint:
    """Base: a connection the meter writes to; ``log_level`` None = not a logger (raw stream)."""

    kind = "endpoint"

    def __init__(self, log_level: LogLevel | None) -> None:
        self.log_level = log_level
        self.lines: collections.deque[bytes] = collections.deque()
        self._partial = bytearray()
        self._partial_since = 0.0
        self.eof = False
        self.closed = False
        self.bytes_accepted = 0
        self.on_input: Callable[[], None] | None = None
        self.discard_input = False
        """Raw stream clients: input is read only to notice the disconnect (§7.1)."""

    # -- input
    def _feed(self, data: bytes) -> None:
        if self.discard_input:
            return
        if not self._partial:
            self._partial_since = time.monotonic()
        self._partial += data
        if self.on_input is not None:
            self.on_input()
        while (i := self._partial.find(b"\n")) >= 0:
            self.lines.append(bytes(self._partial[:i]))
            del self._partial[: i + 1]
            self._partial_since = time.monotonic()

    def next_line(self) -> bytes | None:
        """One command line, or a partial line that waited longer than the read timeout."""
        if self.lines:
            return self.lines.popleft()
        if self._partial and time.monotonic() - self._partial_since > READ_TIMEOUT_S:
            line = bytes(self._partial)
            self._partial.clear()
            return line
        return None

    # -- output
    def write(self, data: bytes) -> int:
        raise NotImplementedError

    def backlog(self) -> int:
        return 0

    @property
    def alive(self) -> bool:
        return not (self.closed or self.eof)

    def close(self) -> None:
        self.closed = True


class TcpEndpoint(Endpoint):
    """An accepted (or dialled-out, §7.2) TCP connection."""

    kind = "tcp"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        log_level: LogLevel | None = LogLevel.INFO,
    ) -> None:
        super().__init__(log_level)
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("0.0.0.0", 0)
        local = writer.get_extra_info("sockname") or ("0.0.0.0", 0)
        self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        self.local_ip = str(local[0])
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader_task: asyncio.Task[None] | None = None
        # The stream protocol keeps the reason the connection died (a reset, a broken pipe)
        # in a future that only wait_closed() retrieves; unretrieved, asyncio reports it as
        # "Future exception was never retrieved".  Watch it from the start.
        self._close_watch = asyncio.get_running_loop().create_task(self._watch_close())

    async def _watch_close(self) -> None:
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError) as exc:
            # A reset or broken pipe is an ordinary disconnect: the firmware just finds the
            # client gone on its 100 ms poll (§2.1, §4.9).
            logger.debug(
                "%s %s:%d: connection lost: %r", self.kind, self.peer_ip, self.peer_port, exc
            )
        self.eof = True

    def start_reading(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(4096)
                if not data:
                    break
                self._feed(data)
        except (ConnectionError, OSError) as exc:  # a reset: a disconnect like any other
            logger.debug("%s %s:%d: read failed: %r", self.kind, self.peer_ip, self.peer_port, exc)
        self.eof = True

    def write(self, data: bytes) -> int:
        if self.closed or self.writer.is_closing():
            return 0
        self.writer.write(data)
        self.bytes_accepted += len(data)
        return len(data)

    def backlog(self) -> int:
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def close(self, *, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reader_task is not None:
            self._reader_task.cancel()
        # Not waited for: cancelling also cancels the protocol's close future, so no reset
        # arriving after this can be left unretrieved.
        self._close_watch.cancel()
        transport = self.writer.transport
        if abort:
            transport.abort()
        else:
            transport.close()


class SerialEndpoint(Endpoint):
    """The USB serial port as a pseudo-terminal; the slave path is what a client opens (§4.12).

    The pty stays across emulated reboots (the USB bridge is a separate chip).  Bytes the
    kernel will not take (nobody reading) are queued up to a limit and then dropped, as a
    USB serial bridge without an open host port drops them; the UART itself never applies
    back-pressure for long, so a serial session never overflows the ring buffer.
    """

    kind = "serial"
    MAX_QUEUED = 262_144

    def __init__(self) -> None:
        super().__init__(LogLevel.ALL)
        self.master_fd, self._slave_fd = os.openpty()
        tty.setraw(self._slave_fd)
        os.set_blocking(self.master_fd, False)
        self.path = os.ttyname(self._slave_fd)
        self._out = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer_armed = False
        self.local_ip = ""
        self.dropped_bytes = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.master_fd, self._on_readable)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.master_fd)
            if self._writer_armed:
                self._loop.remove_writer(self.master_fd)
                self._writer_armed = False

    def reset_session(self) -> None:
        """After a reboot: the serial logger is back at ALL, pending input is gone."""
        self.log_level = LogLevel.ALL
        self.lines.clear()
        self._partial.clear()

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master_fd, 4096)
        except OSError:
            return
        if data:
            self._feed(data)

    def write(self, data: bytes) -> int:
        if self.closed:
            return 0
        if len(self._out) + len(data) > self.MAX_QUEUED:
            # The UART still sends these bytes; it is the host side that loses them.
            self.dropped_bytes += len(data)
            logger.debug("serial %s: nobody reading, %d bytes lost", self.path, len(data))
            return len(data)
        self._out += data
        self._flush()
        return len(data)

    def backlog(self) -> int:
        return len(self._out)

    def _flush(self) -> None:
        while self._out:
            try:
                n = os.write(self.master_fd, self._out[:65536])
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EAGAIN):
                    break
                raise
            del self._out[:n]
        want_writer = bool(self._out)
        if self._loop is not None and want_writer != self._writer_armed:
            if want_writer:
                self._loop.add_writer(self.master_fd, self._flush)
            else:
                self._loop.remove_writer(self.master_fd)
            self._writer_armed = want_writer

    def close(self) -> None:
        if self.closed:
            return
        self.detach()
        self.closed = True
        for fd in (self.master_fd, self._slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
