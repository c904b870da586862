"""The two port-54322 roles: the meter's raw stream (§7.1) and a server meters dial (§7.2).

* :func:`open_raw_stream` connects to an *idle* meter's port 54322.  The meter at once
  streams unprefixed float32 samples (3-phase v,i, 24 bytes per sample, chunks of 1008
  bytes; the rate is whatever the last ``sample`` command set, §7.1, §12 #25) and never
  writes text.  There are no packet numbers, so gaps cannot be detected: the stream carries
  what TCP delivered.  Closing the socket ends the session on the meter (it logs ``TCP
  disconnected while streaming``); ``stop`` from a command client also ends it.
* :class:`StreamServer` listens (by default on port 54322) for meters configured with
  ``streamServer`` (§3.4).  Each meter that dials in behaves exactly like a command client
  on that socket (§7.2): it sends its info line, and *this side* must send ``sample``.
  Accepted meters are handed out as connected :class:`AsyncMeterClient` objects (no
  reconnect: the meter redials every 30 s and arrives as a new client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from ..protocol import STREAM_PORT, Measures, RawSampleDecoder, Samples, SkippedBytes
from ._async import AsyncMeterClient
from ._errors import MeterConnectionError, MeterError, MeterTimeoutError
from ._session import Block
from ._transports import Link, TcpLink, open_tcp_link, serve_tcp_links

logger = logging.getLogger(__name__)

RAW_STREAM_PORT = STREAM_PORT


class RawStream:
    """The port-54322 stream of one meter: iterate :class:`Block` values (no packet numbers).

    ``received_samples`` counts what arrived; ``skipped_bytes`` a partial sample at the end.
    """

    def __init__(self, link: Link, channels: int, label: str) -> None:
        self.meter = label
        self.channels: tuple[str, ...] = (
            Measures.VI.channels if channels == 6 else tuple(f"ch{i}" for i in range(channels))
        )
        self._link = link
        self._decoder = RawSampleDecoder(channels)
        self._blocks: collections.deque[Block] = collections.deque()
        self._wakeup = asyncio.Event()
        self._ended = False
        self._closing = False
        self._error: BaseException | None = None
        self.received_samples = 0
        self.skipped_bytes = 0
        self.started_at = time.monotonic()
        self._task = asyncio.create_task(self._read_loop(), name=f"raw stream {label}")

    async def _read_loop(self) -> None:
        empty_packets = np.empty(0, dtype=np.uint32)
        empty_frames = np.empty(0, dtype=np.int64)
        try:
            while True:
                data = await self._link.read()
                self._decoder.receive_data(data)
                for event in self._decoder.events():
                    if isinstance(event, Samples):
                        self.received_samples += event.n_samples
                        self._blocks.append(
                            Block(event.values, empty_packets, empty_frames, self.channels)
                        )
                    elif isinstance(event, SkippedBytes):
                        self.skipped_bytes += event.count
                        logger.warning("%s: raw stream: %s", self.meter, event.reason)
                self._wakeup.set()
                if not data:
                    break
        except (OSError, ConnectionError) as exc:
            if not self._closing:
                self._error = MeterConnectionError(self.meter, f"raw stream failed: {exc}")
        finally:
            self._ended = True
            self._wakeup.set()
            self._link.close()

    async def next_block(self, timeout: float | None = None) -> Block | None:
        """The next block; None when the meter closed the stream (or after :meth:`close`)."""
        while True:
            if self._blocks:
                return self._blocks.popleft()
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                raise MeterTimeoutError(self.meter, f"no raw data within {timeout} s") from None

    def __aiter__(self) -> AsyncIterator[Block]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Block]:
        while (block := await self.next_block()) is not None:
            yield block

    async def close(self) -> None:
        """Close the socket (the meter then stops this session, §7.1)."""
        self._closing = True
        self._link.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self._link.wait_closed()

    async def __aenter__(self) -> RawStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def open_raw_stream(
    host: str,
    port: int = RAW_STREAM_PORT,
    channels: int = 6,
    *,
    name: str | None = None,
    timeout: float = 5.0,
) -> RawStream:
    """Connect to a meter's raw stream port (§7.1) and start receiving."""
    label = f"smartmeter {name or '?'} ({host}:{port})"
    try:
        link = await asyncio.wait_for(open_tcp_link(host, port), timeout)
    except TimeoutError:
        raise MeterTimeoutError(label, f"connect timed out after {timeout} s") from None
    except OSError as exc:
        raise MeterConnectionError(label, f"cannot connect to the raw stream: {exc}") from exc
    return RawStream(link, channels, label)


class StreamServer:
    """Accept meters that dial in (``streamServer``, §7.2) and hand them out as clients.

    ``async with StreamServer("0.0.0.0", 54322) as server: client = await server.accept()``
    or ``async for client in server``.  ``port=0`` picks a free port (see :attr:`port`).
    Keyword arguments are passed to each :class:`AsyncMeterClient` (``timeout``...).
    """

    def __init__(self, host: str = "0.0.0.0", port: int = RAW_STREAM_PORT, **client_kwargs: Any) -> None:
        self.host = host
        self.requested_port = port
        self._client_kwargs = {"reconnect": False, **client_kwargs}
        self._server: asyncio.Server | None = None
        self._queue: asyncio.Queue[AsyncMeterClient] = asyncio.Queue()
        self._handshakes: set[asyncio.Task[None]] = set()
        self.rejected = 0

    async def start(self) -> StreamServer:
        self._server = await serve_tcp_links(self._on_link, self.host, self.requested_port)
        logger.info("stream server listening on %s:%d", self.host, self.port)
        return self

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None, "call start() first"
        return int(self._server.sockets[0].getsockname()[1])

    def _on_link(self, link: TcpLink) -> None:
        task = asyncio.create_task(self._handshake(link))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, link: TcpLink) -> None:
        given: list[Link] = [link]

        async def opener() -> Link:
            if not given:
                raise ConnectionError("a dialled-in meter cannot be redialled; it redials itself")
            return given.pop()

        client = AsyncMeterClient(
            link.peer_host, link.peer_port, _opener=opener, **self._client_kwargs
        )
        try:
            await client.connect()
        except MeterError as exc:
            self.rejected += 1
            logger.warning("stream server: rejected %s:%s: %s", link.peer_host, link.peer_port, exc)
            link.abort()
            return
        logger.info("stream server: %s dialled in", client.meter_label)
        self._queue.put_nowait(client)

    async def accept(self, timeout: float | None = None) -> AsyncMeterClient:
        """The next meter that dialled in, connected (its info line read)."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise MeterTimeoutError(
                f"stream server ({self.host}:{self.port})", f"no meter dialled in within {timeout} s"
            ) from None

    def __aiter__(self) -> AsyncIterator[AsyncMeterClient]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AsyncMeterClient]:
        while True:
            yield await self.accept()

    async def close(self) -> None:
        """Stop listening; meters accepted but not yet handed out are disconnected."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handshakes):
            task.cancel()
        while not self._queue.empty():
            await self._queue.get_nowait().close()

    async def __aenter__(self) -> StreamServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
