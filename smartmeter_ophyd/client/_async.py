"""The asyncio meter client: a thin I/O shell around the sans-I/O connection.

:class:`AsyncMeterClient` turns the crank of :class:`~smartmeter_ophyd.protocol.
MeterConnection`: bytes the link reads go in, events come out and are routed -- an answer
to the request waiting for it, log lines to subscribers, sample data to the running
:class:`SamplingSession`.  Which reply answers which request, and when a session starts or
ends, is decided by the connection (see its module); this shell only keeps a future per
request, with a timeout whose message names the meter and the command.

Three parts do the rest, each in its own module:

* :class:`~._keeper.ConnectionKeeper` -- connect and handshake, keep-alive, liveness,
  reconnect with backoff and jitter, and the check that a reconnect reached the same meter;
* :class:`~._batcher.ReadBatcher` -- ``SO_RCVLOWAT`` read batching of a full-rate session
  (one shared timer per event loop);
* :class:`~._commands.MeterCommands` -- the command table (the typed methods).

A lost connection fails every waiter and ends the running session with
:class:`MeterConnectionError`; with ``reconnect=True`` the keeper reconnects and tells
subscribers what changed (:class:`Reconnected`).

Limits: one sampling session per connection (the meter samples once at a time).  A session
stopped by *another* client ends without this client seeing the stop reply; the lifeness
line that follows tells it (``ended_by="stopped elsewhere"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Final

from ..protocol import (
    COMMAND_PORT,
    Answered,
    Command,
    CorruptFrame,
    DebugLine,
    DeviceInfo,
    Event,
    Failed,
    Info,
    InfoLine,
    LatePacket,
    LateReply,
    LogLevel,
    LogLine,
    MeterConnection,
    PacketGap,
    PlainLine,
    RefusedLine,
    RepairedFrame,
    Reply,
    ReplyView,
    Sample,
    Samples,
    SessionEnded,
    SessionStarted,
    SkippedBytes,
    Stop,
    StopReply,
    StrayReply,
    Transport,
)
from ._batcher import DEFAULT_BATCH_S, ReadBatcher
from ._commands import CommandMethod, MeterCommands, P, R
from ._errors import MeterCommandError, MeterConnectionError, MeterError, MeterProtocolError
from ._keeper import ConnectionKeeper, parse_info, quiet_level
from ._model import ClientEvent, ConnectionLost, Reconnected, SampleConfig, redact
from ._requests import Requests
from ._sampler import Sampler
from ._session import SamplingSession
from ._subscribers import Subscribers
from ._transports import READ_BUFFER_BYTES, Link, open_serial_link, open_tcp_link

__all__ = ["DEFAULT_PORT", "AsyncMeterClient", "ClientEvent", "ConnectionLost", "Reconnected",
           "SampleConfig"]

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = COMMAND_PORT
_SESSION_EVENTS: Final = frozenset({Samples, PacketGap, LatePacket, CorruptFrame, RepairedFrame})


class AsyncMeterClient(MeterCommands):
    """An asyncio connection to one SmartMeter (firmware 2.2).

    ``name`` labels the meter in errors and logs until the info line supplies the real name.
    ``timeout`` bounds every wait (connect, replies); ``keepalive_s`` paces ``!`` keep-alives.
    ``log_level`` (if given) is set on every (re)connect; the firmware default is INFO.
    ``batch_s`` batches reads of a full-rate TCP session (:mod:`._batcher`; 0 disables).
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        name: str | None = None,
        timeout: float = 5.0,
        keepalive_s: float = 10.0,
        liveness_timeout_s: float = 10.0,
        reconnect: bool = True,
        reconnect_backoff: tuple[float, float] = (0.5, 30.0),
        log_level: LogLevel | None = None,
        coalesce_s: float = 0.0,
        batch_s: float = DEFAULT_BATCH_S,
        _opener: Callable[[], Awaitable[Link]] | None = None,
        _serial: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.coalesce_s = coalesce_s
        self._serial = _serial
        self._configured_name = name
        self._wanted_log_level = log_level
        self._batcher = ReadBatcher(self, batch_s, lambda: self.meter_label)
        self.keeper = ConnectionKeeper(
            self,
            _opener or (lambda: open_tcp_link(host, port)),
            serial=_serial,
            where=host if _serial else f"{host}:{port}",
            timeout=timeout,
            keepalive_s=keepalive_s,
            liveness_timeout_s=liveness_timeout_s,
            reconnect=reconnect,
            backoff=reconnect_backoff,
        )
        self.requests: Requests = Requests(self.keeper, lambda: self.meter_label, self._write, timeout)
        self._sampler = Sampler(self)
        self._connection: MeterConnection | None = None
        self._log_level: LogLevel = quiet_level(_serial)
        self._session: SamplingSession | None = None
        self._session_batch: list[Event] = []
        self._subscribers = Subscribers(lambda: self.meter_label)
        self._handlers: dict[type, Callable[[Any], None]] = {
            LogLine: self._on_log,
            Answered: self.requests.answer,
            InfoLine: self._on_info,
            LateReply: self._on_late,
            StrayReply: self._on_stray,
            Failed: self.requests.fail,
            RefusedLine: self._on_refused,
            SessionStarted: self._sampler.on_started,
            SessionEnded: self._on_session_ended,
            SkippedBytes: self._on_skipped,
            PlainLine: self._on_text,
            DebugLine: self._on_text,
        }
        self.unmatched_replies = 0
        self.bytes_received = 0
        self.reads = 0
        """Chunks the receive loop handled (``bytes_received / reads``: bytes per wake-up)."""

    @classmethod
    def serial(
        cls, device: str, *, baudrate: int = 2_000_000, name: str | None = None, **kwargs: Any
    ) -> AsyncMeterClient:
        """A client on the USB serial port (or the emulator's pty).  Same API; the meter
        sends no info line on serial, so :meth:`connect` asks for one (§4.12)."""
        kwargs.setdefault("reconnect", False)
        return cls(
            device, 0, name=name, _opener=lambda: open_serial_link(device, baudrate),
            _serial=True, **kwargs,
        )

    # ------------------------------------------------------------------- state

    @property
    def info(self) -> DeviceInfo | None:
        """The latest info line (None before the first connect)."""
        return self.keeper.info

    @property
    def meter_label(self) -> str:
        """``smartmeter <name> (<host>:<port>)`` -- how errors and logs name this meter."""
        info = self.keeper.info
        name = (info.name if info and info.name else None) or self._configured_name
        return f"smartmeter {name or '?'} ({self.keeper.where})"

    @property
    def connected(self) -> bool:
        return self.keeper.connected

    @property
    def session(self) -> SamplingSession | None:
        """The running sampling session on this connection, if any."""
        return self._session

    @property
    def log_level(self) -> LogLevel:
        """This connection's log level as last set (not persisted by the meter, §2.4)."""
        return self._log_level

    @property
    def batch_s(self) -> float:
        return self._batcher.batch_s

    @property
    def batch_raises(self) -> int:
        """How often read batching was switched on (for tests and diagnostics)."""
        return self._batcher.raises

    @property
    def receive_low_water(self) -> int:
        """The socket's receive low-water mark now (1 unless reads are batched)."""
        return self._batcher.low_water

    @property
    def last_rx(self) -> float:
        """``time.monotonic()`` of the last bytes received."""
        return self.keeper.last_rx

    @property
    def last_tx(self) -> float:
        """``time.monotonic()`` of the last bytes sent."""
        return self.keeper.last_tx

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<AsyncMeterClient {self.meter_label} {state}>"

    # --------------------------------------------------------------- lifecycle

    async def connect(self) -> DeviceInfo:
        """Connect and read the info line (§2.1, §2.5).

        Raises :class:`MeterConnectionError` (refused, unreachable, or closed without a byte:
        the meter already serves 3 clients), :class:`MeterProtocolError` (the peer is not a
        SmartMeter) or :class:`MeterTimeoutError`.
        """
        return await self.keeper.connect()

    async def close(self) -> None:
        """Stop everything and close the connection.  A running session ends ("closed")."""
        await self.keeper.close()

    async def __aenter__(self) -> AsyncMeterClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---------------------------------------------------- the keeper's host side

    def link_ready(self, link: Link, connection: MeterConnection, rest: list[Event]) -> None:
        self._connection = connection
        self._log_level = quiet_level(self._serial)
        if rest:
            self._dispatch(rest)
        link.attach(functools.partial(self._on_data, link))

    def expect_traffic(self) -> bool:
        # Lifeness/rate logs reach connections at INFO or below (§2.6, §4.7); otherwise
        # only a session that is sending (not paused, no slots, §5) keeps the line busy.
        session = self._session
        return self._log_level <= LogLevel.INFO or (session is not None and session.streaming)

    def publish(self, event: ClientEvent) -> None:
        self._subscribers.publish(event)

    async def after_reconnect(self) -> None:
        if self._wanted_log_level is not None:
            with contextlib.suppress(MeterError):
                await self.set_log_level(self._wanted_log_level)

    # ---------------------------------------------------- the batcher's host side

    def batch_allowed(self) -> bool:
        session, connection = self._session, self._connection
        return (
            session is not None and session.streaming and not session.stop_requested
            and (session.prompt_from is None or session.received_samples < session.prompt_from)
            and connection is not None and not connection.awaiting_reply
            and not self.requests.awaiting_drop
        )

    def held_bytes(self) -> int:
        connection = self._connection
        return connection.decoder.buffered_bytes if connection is not None else 0

    def release_held(self) -> None:
        connection = self._connection
        if connection is not None:
            self._dispatch(connection.release_pending())

    # ------------------------------------------------------------- subscriptions

    def subscribe_logs(self, callback: Callable[[LogLine], None]) -> Callable[[], None]:
        """Call ``callback(LogLine)`` for every log line (level, device_time, text, §2.4);
        returns the unsubscribe function.  Callbacks run in the event loop: keep them short."""
        return self._subscribers.add_log(callback)

    def subscribe_events(self, callback: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with :class:`ConnectionLost` / :class:`Reconnected` events."""
        return self._subscribers.add_event(callback)

    def logs(self) -> AsyncIterator[LogLine]:
        """Async iterator over log lines from now on (ends when the client closes)."""
        return self._subscribers.lines(lambda: self.keeper.closing)

    # -------------------------------------------------------------- receive path

    def _on_data(self, link: Link, data: bytes | memoryview) -> None:
        """The receive loop's body, called by the link for every chunk (``b""`` = closed)."""
        if link is not self.keeper.link:
            return
        if not data:
            self._link_lost(link)
            return
        connection = self._connection
        assert connection is not None
        try:
            self.keeper.last_rx = time.monotonic()
            self.bytes_received += len(data)
            self.reads += 1
            connection.receive_data(data)  # a view of the read buffer: consumed right here
            self._dispatch(connection.events())
        except Exception:  # a bug in dispatch must not leave every waiter hanging
            logger.exception("%s: receive path failed; dropping the connection", self.meter_label)
            link.abort()
            return
        if self.coalesce_s and self._session is not None and len(data) < READ_BUFFER_BYTES // 4:
            # Let the kernel gather more bytes: fewer, larger reads (adds coalesce_s latency).
            link.pause_reading()
            asyncio.get_running_loop().call_later(self.coalesce_s, link.resume_reading)

    def _dispatch(self, events: list[Event]) -> None:
        batch = self._session_batch
        handlers = self._handlers
        for event in events:
            kind = type(event)
            if kind in _SESSION_EVENTS:
                batch.append(event)
                continue
            if batch and (kind is not LogLine or not event.text):  # type: ignore[attr-defined]
                self._flush_batch()  # before anything that may end the session
            handler = handlers.get(kind)
            if handler is not None:
                handler(event)
        if batch:
            self._flush_batch()

    def _flush_batch(self) -> None:
        batch = self._session_batch
        session = self._session
        if session is not None:
            session._feed(batch)
        else:
            samples = sum(e.values.shape[0] for e in batch if isinstance(e, Samples))
            logger.warning(
                "%s: %d data events (%d samples) arrived outside any session of this client",
                self.meter_label, len(batch), samples,
            )
        batch.clear()

    def _on_log(self, line: LogLine) -> None:
        if line.text.startswith("Overflow during ringBuffer write"):
            logger.error("%s: %s -- the meter reboots now (§4.10)", self.meter_label, line.text)
        elif line.text and line.level >= LogLevel.WARNING:
            logger.warning("%s: [%s] %s", self.meter_label, line.level.tag, line.text)
        self._subscribers.log(line)

    def _on_info(self, event: InfoLine) -> None:
        try:
            self.keeper.info = parse_info(self.meter_label, event.reply)
        except MeterProtocolError as exc:
            logger.warning("%s", exc)

    def _on_late(self, event: LateReply) -> None:
        raw = event.reply.raw[:200]
        logger.warning("%s: late reply to an earlier timed-out request discarded: %s",
                       self.meter_label, redact(raw))
        if isinstance(event.request.command, Sample) and isinstance(event.reply, Reply):
            if event.reply.error is False:
                logger.error("%s: the meter started sampling after 'sample' timed out; stop it "
                             "(§6.4: never retry sample)", self.meter_label)

    def _on_stray(self, event: StrayReply) -> None:
        if event.reason.startswith("reqSamples refused") and self._session is not None:
            logger.warning("%s: %s: %s", self.meter_label, event.reason, event.reply.raw[:200])
            return
        self.unmatched_replies += 1
        what = "reply nobody waits for" if isinstance(event.reply, Reply) else "unparsable reply line"
        logger.warning("%s: %s (%s): %s", self.meter_label, what, event.reason,
                       redact(event.reply.raw[:200]))

    def _on_refused(self, event: RefusedLine) -> None:
        logger.warning("%s: reply line refused (%s): %r", self.meter_label, event.reason,
                       event.head)

    def _on_session_ended(self, event: SessionEnded) -> None:
        self._batcher.unwatch()
        session = self._session
        if event.reply is None and session is not None:
            # a lifeness line: another client stopped the session (§4.8); no stop reply comes
            session._finish(ended_by="stopped elsewhere")

    def _on_skipped(self, event: SkippedBytes) -> None:
        if self._session is not None:
            self._session_batch.append(event)
        logger.warning("%s: skipped %d bytes (%s): %r", self.meter_label, event.count,
                       event.reason, event.head[:32])

    def _on_text(self, event: PlainLine | DebugLine) -> None:
        if logger.isEnabledFor(logging.DEBUG):  # meter_label is built per call
            logger.debug("%s: %s", self.meter_label, event.text)

    def _link_lost(self, link: Link) -> None:
        self._batcher.unwatch()
        connection = self._connection
        if connection is not None:
            try:
                connection.receive_data(b"")
                self._dispatch(connection.events())
            except Exception:
                logger.exception("%s: decoding the end of the stream failed", self.meter_label)
            connection.close()
        self._connection = None
        closing = self.keeper.closing
        reason = ("client closed" if closing else "the meter closed the connection"
                  if link.error is None else f"connection error: {link.error}")
        expected, overflow = self.keeper.lost(link)
        if overflow:
            reason += "; the meter announced a ring-buffer overflow and reboots (§4.10)"
        label = self.meter_label
        if not closing:
            logger.warning("%s: connection lost: %s", label, reason)
        self.requests.lost(reason)
        session = self._session
        if session is not None and session.active:
            self._session = None
            session._finish(
                ended_by="closed" if closing else "connection lost",
                error=MeterConnectionError(
                    label,
                    f"sampling session ended: connection lost ({reason}); "
                    f"{session.received_samples} samples were received, the meter discards "
                    "the rest (§4.9)",
                ),
            )
        self.publish(ConnectionLost(label, reason, expected))

    # ----------------------------------------------------------------- requests

    def _bind_command(self, method: CommandMethod[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
        return functools.wraps(method.impl)(functools.partial(method.impl, self))

    def _write(self, data: bytes) -> None:
        self._batcher.drop()  # whatever answers must not wait for a full batch
        self.keeper.write(data)

    async def request_reply(self, command: Command, *, timeout: float | None = None) -> Reply:
        """Send ``command`` and return its raw :class:`Reply` (matched by the connection).

        Only for commands with a JSON reply (``expects_reply``); use :meth:`request` for
        the typed view and error checks.
        """
        if not command.expects_reply and not isinstance(command, Info):
            raise MeterCommandError(self.meter_label, f"{command.name!r} has no JSON reply to wait for")
        reply = (await self.requests.exchange(command, timeout)).reply
        assert isinstance(reply, Reply)
        return reply

    async def _request(self, command: Command, timeout: float | None) -> ReplyView | None:
        if isinstance(command, Sample):
            raise MeterCommandError(
                self.meter_label, "start sampling with sample(), which returns the session"
            )
        if isinstance(command, Stop):
            return await self._stop(timeout)
        if command.reboots:
            await self.requests.reboot(command, timeout)
            return None
        if not command.expects_reply and not isinstance(command, Info):
            self.requests.send_silent(command)
            return None
        return await self.requests.typed(command, ReplyView, timeout)

    async def _stop(self, timeout: float | None) -> StopReply:
        session = self._session
        if session is not None:
            await session.stop(timeout)
            reply = session.stop_reply
            if reply is None:
                raise MeterProtocolError(self.meter_label, "the session ended without a stop reply")
            return reply
        view = await self.requests.typed(Stop(), StopReply, timeout)
        return view

    # ----------------------------------------------------------------- sampling

    async def sample(
        self, config: SampleConfig | Sample | None = None, /, **settings: Any
    ) -> SamplingSession:
        """Start sampling and return the :class:`SamplingSession` (§4).

        Give a :class:`SampleConfig`, a codec ``Sample`` or the same fields as keywords
        (``client.sample(rate=4000, transport="UDP")``).  UDP binds a local port on the
        interface that talks to the meter (``port`` None/0 = any free port) and accepts
        datagrams only from the meter's address.
        """
        if config is None:
            config = SampleConfig(**settings)
        elif settings:
            raise TypeError("give either a config or keyword settings, not both")
        return await self._sampler.start(config)

    def _adopt_session(self, session: SamplingSession, stream_bytes_per_s: float) -> None:
        """``session`` now runs on this connection (its frames come through ``_dispatch``)."""
        self._session = session
        link = self.keeper.link
        if link is not None and session.transport is not Transport.UDP:
            self._batcher.watch(link, stream_bytes_per_s, not self._serial)

    def _session_ended(self, session: SamplingSession) -> None:
        if self._session is session:
            self._session = None
            self._batcher.unwatch()
            connection = self._connection
            if connection is not None and connection.session_active:
                connection.end_session()
