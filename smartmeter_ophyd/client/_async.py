"""The asyncio meter client: the only code in the project that owns a meter's socket.

:class:`AsyncMeterClient` turns the crank of the sans-I/O codec: one receive loop reads
bytes, feeds :class:`~smartmeter_ophyd.protocol.StreamDecoder` and dispatches its events --
replies to the request waiting for them, log lines to subscribers, sample data to the
running :class:`SamplingSession`.  Commands are the codec's frozen dataclasses; the client
sends ``command.encode()`` in one write and parses the answer with ``parse_reply``.

Request/reply matching (the firmware has no request ids, §2.8):

* at most one outstanding request per reply ``cmd``, matched by the echoed ``cmd``;
* commands whose echo the firmware corrupts (``calibration``, ``dailyRestart``, ``ade9k``,
  ``getLog``; §2.9) are serialised among themselves and take the next reply that no other
  request claims and that does not name another command;
* ``info`` is answered by the info line, ``reqSamples`` is silent on success (§5.2), the
  restart family answers by dropping the connection (§3.15);
* inverted error flags (``ntp``, ``addWifi``) and busy replies are judged by the codec;
  log lines of other clients interleave freely (§2.4).

Every wait has a timeout whose message names the meter and the command.  A lost connection
fails every waiter and ends the running session with :class:`MeterConnectionError`; with
``reconnect=True`` the client reconnects with backoff, re-reads the info line and tells
subscribers what changed (:class:`Reconnected`).

Liveness: ``!`` keep-alives (never ``?``, which answers with a line, §2.2) every
``keepalive_s``; the link is declared dead when nothing arrived for ``liveness_timeout_s``
while traffic is expected (an idle meter sends a lifeness line every second to connections
at level INFO or below, §2.6; a sampling meter logs its rate every second, §4.7).

Read batching (CPU cost of ingest): at 8 kHz x 6 channels a meter sends ~195 kB/s in TCP
segments of a few kB, and waking the event loop per segment costs far more CPU than decoding
the bytes.  While a TCP session on this connection streams at full rate, the client raises
the socket's receive low-water mark (``SO_RCVLOWAT``; Linux epoll honours it for TCP) to
``batch_s`` seconds of data (at most 256 KiB), so the loop wakes about once per ``batch_s`` per
meter.  Streams slower than 16 KiB per ``batch_s`` (e.g. 8 kHz VI is ~192 kB/s; below ~2.7 kHz
at the default) are never batched, and neither are paused, slotted or not-yet-started ones.

The trade-off is latency: samples (and log lines) reach the session up to ``batch_s`` later
(default 0.25 s).  A stream that stalls or slows below the mark is read after
``1.5 * batch_s`` without a batch (the mark drops to 1 and stays there until the stream is
back at full rate; a frame held for proof follows ``RELEASE_QUIET_S`` later).  Replies stay
prompt: the mark drops to 1 before every command is sent (``stop``, ``cts``, ``reqSamples``,
``info``...), and it is raised again only when no reply is awaited, the session is not
stopping and the last ``batch_s`` brought at least half a batch.  Connection loss is never
delayed (the kernel reports EOF and errors regardless of the mark).  ``batch_s=0`` disables
batching; serial and UDP sessions are not batched.  The older ``coalesce_s`` (pause reading
after a small read) still works but costs a pause/resume and a timer per read.

Limits: one sampling session per connection (the meter samples once at a time).  A session
stopped by *another* client ends without this client seeing the stop reply; the stream just
goes quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..protocol import (
    COMMANDS,
    KEEPALIVE,
    PROBE,
    AddWifi,
    Ade9kAccess,
    Ade9kReply,
    BasicReset,
    BusyReply,
    ClearLog,
    Command,
    CommandError,
    ConnectionClosed,
    CorruptFrame,
    Cts,
    DatagramDecoder,
    DebugLine,
    DelWifi,
    DeviceInfo,
    EnergyReading,
    Event,
    FactoryReset,
    GetCurrent,
    GetEnergy,
    GetLog,
    GetPeriod,
    GetPhaseAngle,
    GetPower,
    GetVoltage,
    Info,
    LatePacket,
    LineValues,
    LogDump,
    LogLevel,
    LogLevelReply,
    LogLine,
    Measures,
    MessageReply,
    NtpReply,
    NtpSync,
    PacketGap,
    PlainLine,
    PowerReading,
    RemoteProtocolError,
    RepairedFrame,
    Reply,
    ReplyView,
    RequestSamples,
    ResetEnergy,
    Restart,
    Sample,
    SampleReply,
    Samples,
    SetCalibration,
    SetDailyRestart,
    SetLogLevel,
    SetMqttServer,
    SetName,
    SetStreamServer,
    SetTimeServer,
    SkippedBytes,
    Stop,
    StopReply,
    StreamDecoder,
    Transport,
    UnparsedReply,
    WifiReply,
    check_start_window,
    is_log_dump,
    parse_log_dump,
    parse_reply,
)
from ._errors import (
    MeterBusyError,
    MeterCommandError,
    MeterCommandRejected,
    MeterConnectionError,
    MeterError,
    MeterIdentityError,
    MeterProtocolError,
    MeterTimeoutError,
)
from ._session import SamplingSession
from ._transports import (
    READ_BUFFER_BYTES,
    Link,
    UdpReceiver,
    open_serial_link,
    open_tcp_link,
    open_udp_receiver,
)

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 54321
OVERFLOW_LOG_TEXT: Final = "Overflow during ringBuffer write"
"""The ERROR log a meter sends (maybe) just before its overflow reboot (§4.10)."""
RELEASE_QUIET_S: Final = 0.2
"""A held last frame is released after the stream was quiet this long (reqSamples, §5.2)."""
DEFAULT_BATCH_S: Final = 0.25
"""Default read batching while streaming: wake about this often per meter (adds this latency)."""
BATCH_MIN_BYTES: Final = 16 * 1024
BATCH_MAX_BYTES: Final = 256 * 1024
"""Bounds of the receive low-water mark while batching (the read buffer is 256 KiB)."""
HOUSEKEEPING_MIN_S: Final = 0.02
HOUSEKEEPING_MAX_S: Final = 2.0
BATCH_STALL_FACTOR: Final = 1.5
"""Drop the low-water mark when no read came for this many ``batch_s`` (stall, slow-down)."""
UDP_DRAIN_QUIET_S: Final = 0.25
UDP_DRAIN_MAX_S: Final = 2.0
READ_SIZE: Final = READ_BUFFER_BYTES

_SESSION_EVENTS: Final = (Samples, PacketGap, LatePacket, CorruptFrame, RepairedFrame)
_COMMAND_NAMES: Final = frozenset(COMMANDS)
_LOOSE: Final = "<commands with a corrupted cmd echo>"
_V = TypeVar("_V", bound=ReplyView)
_C = TypeVar("_C", bound=Command)


# ---------------------------------------------------------------------- client events


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The connection to the meter dropped.  ``expected`` when we asked for a reboot."""

    meter: str
    reason: str
    expected: bool


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The client reconnected.  ``changes`` maps info keys to ``(before, after)``.

    ``rebooted`` is True when the client knows the meter rebooted (we sent a restart
    command, or the meter announced an overflow reboot, §4.10), else None: the info line
    carries no uptime, so an unannounced reboot can only be guessed from ``changes``.
    """

    meter: str
    previous: DeviceInfo | None
    current: DeviceInfo
    changes: dict[str, tuple[Any, Any]]
    rebooted: bool | None
    attempts: int


ClientEvent = ConnectionLost | Reconnected


@dataclass(frozen=True, slots=True)
class SampleConfig:
    """What to sample (a thin wrapper around the codec's ``Sample`` command, §4.1).

    ``port`` is only for UDP: None or 0 lets the client bind a free port and send that.
    ``start_time`` (unix s, integer) schedules the start (§6.4; 0.5..20 s ahead).
    """

    transport: Transport | str = Transport.TCP
    rate: int = 8000
    measures: Measures | str = Measures.VI
    prefix: bool = True
    port: int | None = None
    flow_control: bool = False
    slot: tuple[int, int] | None = None
    start_time: int | None = None

    def to_command(self, port: int | None = None) -> Sample:
        return Sample(
            transport=self.transport,  # type: ignore[arg-type]  # Sample coerces strings
            rate=self.rate,
            measures=self.measures,  # type: ignore[arg-type]
            prefix=self.prefix,
            port=port if port is not None else self.port,
            flow_control=self.flow_control,
            slot=self.slot,
            start_time=self.start_time,
        )


class _Waiter:
    __slots__ = ("command", "dump", "future", "name", "on_reply")

    def __init__(
        self,
        command: Command,
        future: asyncio.Future[Reply],
        on_reply: Callable[[Reply], None] | None = None,
    ) -> None:
        self.command = command
        self.name = command.name
        self.future = future
        self.dump: Reply | UnparsedReply | None = None
        self.on_reply = on_reply


_SECRET_PATTERNS: Final = (
    (re.compile(r'("pwd"\s*:\s*")[^"]*(")'), r"\1***\2"),
    (re.compile(r"(PW: )[^,\"]*"), r"\1***"),
)


def _redact(text: str) -> str:
    """Hide WiFi passwords (``pwd`` keys, ``PW:`` in addWifi's msg, §3.6) before logging."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _describe(command: Command) -> str:
    """The command for logs: its wire name, never its arguments (passwords, §3.6)."""
    return command.name


class AsyncMeterClient:
    """An asyncio connection to one SmartMeter (firmware 2.2).

    ``name`` labels the meter in errors and logs until the info line supplies the real name.
    ``timeout`` bounds every wait (connect, replies); ``keepalive_s`` paces ``!`` keep-alives.
    ``log_level`` (if given) is set on every (re)connect; the firmware default is INFO.
    ``batch_s`` batches reads of a full-rate TCP session (module docstring; 0 disables).
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
        self.keepalive_s = keepalive_s
        self.liveness_timeout_s = liveness_timeout_s
        self.reconnect = reconnect
        self.reconnect_backoff = reconnect_backoff
        self.coalesce_s = coalesce_s
        if batch_s < 0:
            raise ValueError(f"batch_s must be >= 0, got {batch_s!r}")
        self.batch_s = batch_s
        self._configured_name = name
        self._wanted_log_level = log_level
        self._opener = _opener or (lambda: open_tcp_link(host, port))
        self._serial = _serial
        self._link: Link | None = None
        self._decoder: StreamDecoder | None = None
        self._info: DeviceInfo | None = None
        self._log_level = LogLevel.ALL if _serial else LogLevel.INFO
        self._keepalive_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._loose: _Waiter | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._loose_lock = asyncio.Lock()
        self._info_waiters: list[asyncio.Future[Reply]] = []
        self._probe_waiters: list[asyncio.Future[None]] = []
        self._session: SamplingSession | None = None
        self._session_batch: list[Event] = []
        self._handshake_rest: list[Event] = []
        self._log_subscribers: list[Callable[[LogLine], None]] = []
        self._event_subscribers: list[Callable[[ClientEvent], None]] = []
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._closing = False
        self._expect_drop = False
        self._overflow_seen = False
        self._name_after_reboot: str | None = None
        """The name our own factoryReset gives the meter (a reconnect may find it renamed)."""
        self._refusal: str | None = None
        """Why the client will not reconnect (it found another meter at the address)."""
        self._release_handle: asyncio.TimerHandle | None = None
        self._batch_handle: asyncio.TimerHandle | None = None
        self._batch_mark = 0
        self._low_water_dropped_at = 0.0
        self.batch_raises = 0
        """How often read batching was switched on (for tests and diagnostics)."""
        self._drop_waiters: list[asyncio.Future[None]] = []
        self._stale: dict[str, int] = {}
        self.unmatched_replies = 0
        self.bytes_received = 0
        self.reads = 0
        """Chunks the receive loop handled (``bytes_received / reads``: bytes per wake-up)."""

    # ------------------------------------------------------------------- identity

    @classmethod
    def serial(
        cls, device: str, *, baudrate: int = 2_000_000, name: str | None = None, **kwargs: Any
    ) -> AsyncMeterClient:
        """A client on the USB serial port (or the emulator's pty).  Same API; the meter
        sends no info line on serial, so :meth:`connect` asks for one (§4.12)."""
        kwargs.setdefault("reconnect", False)
        return cls(
            device,
            0,
            name=name,
            _opener=lambda: open_serial_link(device, baudrate),
            _serial=True,
            **kwargs,
        )

    @property
    def info(self) -> DeviceInfo | None:
        """The latest info line (None before the first connect)."""
        return self._info

    @property
    def meter_label(self) -> str:
        """``smartmeter <name> (<host>:<port>)`` -- how errors and logs name this meter."""
        name = (self._info.name if self._info and self._info.name else None) or self._configured_name
        where = self.host if self._serial else f"{self.host}:{self.port}"
        return f"smartmeter {name or '?'} ({where})"

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.is_closing

    @property
    def session(self) -> SamplingSession | None:
        """The running sampling session on this connection, if any."""
        return self._session

    @property
    def log_level(self) -> LogLevel:
        """This connection's log level as last set (not persisted by the meter, §2.4)."""
        return self._log_level

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<AsyncMeterClient {self.meter_label} {state}>"

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> DeviceInfo:
        """Connect and read the info line (§2.1, §2.5).

        Raises :class:`MeterConnectionError` (refused, unreachable, or closed without a byte:
        the meter already serves 3 clients), :class:`MeterProtocolError` (the peer is not a
        SmartMeter) or :class:`MeterTimeoutError`.
        """
        self._closing = False
        info = await self._establish()
        self._start_background()
        return info

    async def _establish(self, same_meter_as: DeviceInfo | None = None) -> DeviceInfo:
        label = self.meter_label
        try:
            link = await asyncio.wait_for(self._opener(), self.timeout)
        except TimeoutError:
            raise MeterTimeoutError(label, f"connect timed out after {self.timeout} s") from None
        except (OSError, ValueError) as exc:
            raise MeterConnectionError(label, f"cannot connect: {exc}") from exc
        except Exception as exc:  # pyserial's SerialException is not an OSError
            raise MeterConnectionError(label, f"cannot open: {exc}") from exc
        decoder = StreamDecoder(serial=self._serial)
        try:
            if self._serial:
                link.write(Info().encode())
                self._last_tx = time.monotonic()
            reply = await self._read_info_line(link, decoder)
            info = self._parse_info(reply)
            if same_meter_as is not None and info.name not in (
                same_meter_as.name, self._name_after_reboot
            ):
                where = self.host if self._serial else f"{self.host}:{self.port}"
                raise MeterIdentityError(
                    label,
                    f"{where} now answers as meter {info.name!r}, not "
                    f"{same_meter_as.name!r} (another meter took the address, or it was "
                    "renamed); not reconnecting, so no command reaches the wrong meter",
                )
            self._log_level = LogLevel.ALL if self._serial else LogLevel.INFO
        except BaseException:
            link.abort()
            await link.wait_closed()
            raise
        self._link = link
        self._decoder = decoder
        self._name_after_reboot = None
        self._stale.clear()
        self._info = info
        self._last_rx = time.monotonic()
        self._expect_drop = False
        self._overflow_seen = False
        logger.info("%s: connected (firmware %s, state %s)", self.meter_label, info.version, info.state)
        return info

    async def _read_info_line(self, link: Link, decoder: StreamDecoder) -> Reply:
        """Read until the info line (TCP: the first line, §2.1; serial: we asked for it).

        Events decoded after the info line in the same read are kept for dispatch.
        """
        label = self.meter_label
        deadline = time.monotonic() + self.timeout
        received = 0
        head = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if received:
                    raise MeterProtocolError(
                        label,
                        f"no info line within {self.timeout} s; the peer sent {received} bytes "
                        f"starting {bytes(head)!r}: not a SmartMeter?",
                    )
                raise MeterTimeoutError(
                    label, f"connected but no info line within {self.timeout} s"
                )
            try:
                data = await asyncio.wait_for(link.read(), remaining)
            except TimeoutError:
                continue
            except (OSError, ConnectionError) as exc:
                raise MeterConnectionError(label, f"connection failed: {exc}") from exc
            if not data:
                if not received:
                    raise MeterConnectionError(
                        label,
                        "the meter closed the connection without sending anything; it "
                        "already serves its maximum of 3 clients (§2.1)?",
                    )
                raise MeterProtocolError(
                    label,
                    f"connection closed after {received} bytes without an info line "
                    f"(starting {bytes(head)!r}): not a SmartMeter?",
                )
            received += len(data)
            if len(head) < 64:
                head += data[: 64 - len(head)]
            decoder.receive_data(data)
            events = decoder.events()
            for index, event in enumerate(events):
                if isinstance(event, Reply) and event.cmd == "info":
                    self._handshake_rest = events[index + 1 :]
                    return event
                if self._serial:
                    continue  # the serial line carries whatever ran before we opened it
                if isinstance(event, LogLine):
                    continue  # a log line may precede the info line on a reconnect race
                raise MeterProtocolError(
                    label,
                    f"expected the info line first, got {type(event).__name__} "
                    f"(first bytes {bytes(head)!r}): not a SmartMeter?",
                )

    def _parse_info(self, reply: Reply) -> DeviceInfo:
        try:
            view = parse_reply(reply, "info")
        except RemoteProtocolError as exc:
            raise MeterProtocolError(self.meter_label, f"bad info line: {exc}") from exc
        assert isinstance(view, DeviceInfo)
        if not view.is_smartmeter:
            raise MeterProtocolError(
                self.meter_label,
                f"the peer's info line says type {view.device_type!r}, not 'smartmeter'",
            )
        return view

    def _start_background(self) -> None:
        link, decoder = self._link, self._decoder
        assert link is not None and decoder is not None
        rest, self._handshake_rest = self._handshake_rest, []
        if rest:
            self._dispatch(rest)
        link.attach(lambda data: self._on_data(link, decoder, data))
        if self._keepalive_task is None or self._keepalive_task.done():
            self._keepalive_task = asyncio.create_task(
                self._keepalive_loop(), name=f"keepalive {self.meter_label}"
            )

    async def close(self) -> None:
        """Stop everything and close the connection.  A running session ends ("closed")."""
        self._closing = True
        tasks = [t for t in (self._reconnect_task, self._keepalive_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        link = self._link
        if link is not None:
            link.close()
            await link.wait_closed()
        self._link = None
        self._keepalive_task = self._reconnect_task = None

    async def __aenter__(self) -> AsyncMeterClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -------------------------------------------------------------- subscriptions

    def subscribe_logs(self, callback: Callable[[LogLine], None]) -> Callable[[], None]:
        """Call ``callback(LogLine)`` for every log line (level, device_time, text, §2.4);
        returns the unsubscribe function.  Callbacks run in the event loop: keep them short."""
        self._log_subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._log_subscribers.remove(callback)

        return unsubscribe

    async def logs(self) -> AsyncIterator[LogLine]:
        """Async iterator over log lines from now on (ends when the client closes)."""
        queue: asyncio.Queue[LogLine | None] = asyncio.Queue()
        unsubscribe = self.subscribe_logs(queue.put_nowait)
        closer = self.subscribe_events(
            lambda event: queue.put_nowait(None)
            if isinstance(event, ConnectionLost) and self._closing
            else None
        )
        try:
            while True:
                line = await queue.get()
                if line is None:
                    return
                yield line
        finally:
            unsubscribe()
            closer()

    def subscribe_events(self, callback: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with :class:`ConnectionLost` / :class:`Reconnected` events."""
        self._event_subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._event_subscribers.remove(callback)

        return unsubscribe

    def _publish(self, event: ClientEvent) -> None:
        for callback in list(self._event_subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("%s: event subscriber failed", self.meter_label)

    # ------------------------------------------------------------------ receive loop

    def _on_data(self, link: Link, decoder: StreamDecoder, data: bytes | memoryview) -> None:
        """The receive loop's body, called by the link for every chunk (``b""`` = closed)."""
        if link is not self._link:
            return
        if not data:
            self._finish_link(link, decoder)
            return
        try:
            self._last_rx = time.monotonic()
            self.bytes_received += len(data)
            self.reads += 1
            decoder.receive_data(data)  # a view of the read buffer
            self._dispatch(decoder.events())
        except Exception:  # a bug in dispatch must not leave every waiter hanging
            logger.exception("%s: receive path failed; dropping the connection", self.meter_label)
            link.abort()
            return
        if link.receive_low_water > 1:
            # Batching: the next batch proves the held frame.  Re-arm the stall deadline
            # here, in a wake-up that happens anyway, instead of waking for a periodic check.
            if self._batch_handle is not None:
                self._batch_handle.cancel()
            self._batch_handle = asyncio.get_running_loop().call_later(
                BATCH_STALL_FACTOR * self.batch_s, self._batch_stalled
            )
        elif decoder.buffered_bytes:
            # Due RELEASE_QUIET_S after this read: re-armed here (a wake-up that happens
            # anyway) rather than firing every RELEASE_QUIET_S while the stream runs.
            if self._release_handle is not None:
                self._release_handle.cancel()
            self._arm_release(decoder)
        if self.coalesce_s and self._session is not None and len(data) < READ_SIZE // 4:
            # Let the kernel gather more bytes: fewer, larger reads (adds coalesce_s latency).
            link.pause_reading()
            asyncio.get_running_loop().call_later(self.coalesce_s, link.resume_reading)

    def _finish_link(self, link: Link, decoder: StreamDecoder) -> None:
        if self._release_handle is not None:
            self._release_handle.cancel()
            self._release_handle = None
        self._stop_batching(link)
        try:
            decoder.receive_data(b"")
            self._dispatch(decoder.events())
        except Exception:
            logger.exception("%s: decoding the end of the stream failed", self.meter_label)
        error = link.error
        if self._closing:
            reason = "client closed"
        elif error is None:
            reason = "the meter closed the connection"
        else:
            reason = f"connection error: {error}"
        self._on_connection_lost(link, reason)

    def _arm_release(self, decoder: StreamDecoder) -> None:
        self._release_handle = asyncio.get_running_loop().call_later(
            RELEASE_QUIET_S, self._release_held, decoder
        )

    def _release_held(self, decoder: StreamDecoder) -> None:
        self._release_handle = None
        if decoder is not self._decoder or not decoder.buffered_bytes:
            return
        link = self._link
        if link is not None and link.receive_low_water > 1:
            return  # batching: more bytes are coming; dropping the mark re-arms this timer
        # quiet since the last read, or since batching ended (its bytes are read first)
        quiet = time.monotonic() - max(self._last_rx, self._low_water_dropped_at)
        if quiet >= RELEASE_QUIET_S:
            self._dispatch(decoder.release_pending())
        else:
            self._release_handle = asyncio.get_running_loop().call_later(
                RELEASE_QUIET_S - quiet, self._release_held, decoder
            )

    # ------------------------------------------------------------------ read batching

    def _start_batching(self, session: SamplingSession) -> None:
        """Watch a TCP session on this connection; batch its reads while it streams."""
        if not self.batch_s or self._serial or session.transport is Transport.UDP:
            return
        self._schedule_batch_tick()

    def _schedule_batch_tick(self) -> None:
        if self._batch_handle is not None:
            self._batch_handle.cancel()
        self._batch_mark = self.bytes_received
        self._batch_handle = asyncio.get_running_loop().call_later(self.batch_s, self._batch_tick)

    def _stop_batching(self, link: Link | None) -> None:
        if self._batch_handle is not None:
            self._batch_handle.cancel()
            self._batch_handle = None
        if link is not None and link.receive_low_water > 1 and link.set_receive_low_water(1):
            self._low_water_dropped_at = time.monotonic()

    def _drop_low_water(self, link: Link) -> None:
        """Back to a wake-up per arrival (a reply is due, or the stream stalled or slowed);
        the periodic check raises the mark again when the stream is back at full rate."""
        if link.receive_low_water <= 1 or not link.set_receive_low_water(1):
            return
        self._low_water_dropped_at = time.monotonic()
        decoder = self._decoder
        if decoder is not None and self._release_handle is None and decoder.buffered_bytes:
            self._arm_release(decoder)  # a held last frame with nothing behind it (§5.2)
        session = self._session
        if session is not None and session.active:
            self._schedule_batch_tick()
        elif self._batch_handle is not None:
            self._batch_handle.cancel()
            self._batch_handle = None

    def _batch_stalled(self) -> None:
        """No batch for ``BATCH_STALL_FACTOR * batch_s``: read whatever is waiting."""
        self._batch_handle = None
        link = self._link
        if link is not None:
            self._drop_low_water(link)

    def _batch_bytes(self, session: SamplingSession) -> int:
        """``batch_s`` of the session's nominal byte rate, at most 256 KiB; 0 when that is
        under 16 KiB (a slow stream: batching would add more than ``batch_s`` of latency)."""
        wanted = int(session.rate * session.measures.bytes_per_sample * self.batch_s)
        return 0 if wanted < BATCH_MIN_BYTES else min(BATCH_MAX_BYTES, wanted)

    def _awaiting_reply(self) -> bool:
        return bool(
            self._waiters or self._loose or self._info_waiters or self._probe_waiters
            or self._drop_waiters
        )

    def _batch_tick(self) -> None:
        """Every ``batch_s`` while a session runs unbatched: raise the receive low-water
        mark once the stream is at full rate and nothing waits for a reply."""
        self._batch_handle = None
        session, link = self._session, self._link
        if session is None or not session.active or link is None or link.is_closing:
            return
        received = self.bytes_received - self._batch_mark
        batch = self._batch_bytes(session)
        if (
            batch
            and link.receive_low_water <= 1
            and received >= batch // 2  # not paused or slowed down (scheduled start, §5)
            and session.streaming
            and not session.stop_requested
            and not self._awaiting_reply()
            and link.set_receive_low_water(batch)
        ):
            self.batch_raises += 1
            self._batch_handle = asyncio.get_running_loop().call_later(
                BATCH_STALL_FACTOR * self.batch_s, self._batch_stalled
            )
            return
        self._schedule_batch_tick()

    def _dispatch(self, events: list[Event]) -> None:
        batch = self._session_batch
        for event in events:
            kind = type(event)
            if kind is Samples or isinstance(event, _SESSION_EVENTS):
                batch.append(event)
                continue
            if kind is LogLine:
                assert isinstance(event, LogLine)
                if batch and not event.text:
                    self._flush_batch()  # a lifeness line may end the session (see _on_log)
                self._on_log(event)
                continue
            if batch:
                self._flush_batch()
            if kind is Reply:
                assert isinstance(event, Reply)
                self._on_reply(event)
            elif kind is UnparsedReply:
                assert isinstance(event, UnparsedReply)
                self._on_unparsed(event)
            elif kind is PlainLine:
                assert isinstance(event, PlainLine)
                if event.text.strip() == "Setup done" and self._probe_waiters:
                    for future in self._probe_waiters:
                        if not future.done():
                            future.set_result(None)
                    self._probe_waiters.clear()
                elif logger.isEnabledFor(logging.DEBUG):  # meter_label is built per call
                    logger.debug("%s: %s", self.meter_label, event.text)
            elif kind is SkippedBytes:
                assert isinstance(event, SkippedBytes)
                if self._session is not None:
                    batch.append(event)
                logger.warning(
                    "%s: skipped %d bytes (%s): %r",
                    self.meter_label,
                    event.count,
                    event.reason,
                    event.head[:32],
                )
            elif kind is DebugLine:
                assert isinstance(event, DebugLine)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("%s: serial debug: %s", self.meter_label, event.text)
            elif kind is ConnectionClosed:
                pass
        if batch:
            self._flush_batch()

    def _flush_batch(self) -> None:
        batch = self._session_batch
        session = self._session
        if session is not None:
            session._feed(batch)
            batch.clear()
        else:
            samples = sum(e.values.shape[0] for e in batch if isinstance(e, Samples))
            logger.warning(
                "%s: %d data events (%d samples) arrived outside any session of this client",
                self.meter_label,
                len(batch),
                samples,
            )
            batch.clear()

    def _on_log(self, line: LogLine) -> None:
        session = self._session
        if not line.text and session is not None and session.frames and not session.stop_requested:
            # Lifeness lines are only sent while idle (§2.6): the session that was streaming
            # to us was stopped elsewhere (another client's stop, §4.8); no stop reply comes.
            if self._decoder is not None:
                self._decoder.end_session()
            session._finish(ended_by="stopped elsewhere")
        if line.text.startswith(OVERFLOW_LOG_TEXT):
            self._overflow_seen = True
            logger.error("%s: %s -- the meter reboots now (§4.10)", self.meter_label, line.text)
        elif line.text and line.level >= LogLevel.WARNING:
            logger.warning("%s: [%s] %s", self.meter_label, line.level.tag, line.text)
        for callback in list(self._log_subscribers):
            try:
                callback(line)
            except Exception:
                logger.exception("%s: log subscriber failed", self.meter_label)

    def _on_unparsed(self, event: UnparsedReply) -> None:
        loose = self._loose
        if loose is not None and loose.name == GetLog.name and loose.dump is None:
            loose.dump = event
            return
        self.unmatched_replies += 1
        logger.warning(
            "%s: unparsable reply line %r", self.meter_label, _redact(event.raw[:120])
        )

    def _on_reply(self, reply: Reply) -> None:
        cmd = reply.cmd
        if cmd == "info" and "type" in reply.fields:
            try:
                self._info = self._parse_info(reply)
            except MeterProtocolError as exc:
                logger.warning("%s", exc)
            waiters, self._info_waiters = self._info_waiters, []
            for future in waiters:
                if not future.done():
                    future.set_result(reply)
            return
        loose = self._loose
        if loose is not None and loose.name == GetLog.name and loose.dump is None:
            if is_log_dump(reply):
                loose.dump = reply
                return
        waiter = self._waiters.get(cmd) if cmd is not None else None
        if waiter is None and loose is not None:
            if loose.name == GetLog.name and loose.dump is None:
                waiter = None  # the final getLog line comes only after the dump
            elif cmd == loose.name or cmd not in _COMMAND_NAMES:
                waiter = loose
        stale_key = _LOOSE if waiter is not None and waiter is loose else cmd
        if stale_key is not None and self._stale.get(stale_key):
            self._stale[stale_key] -= 1
            logger.warning(
                "%s: late reply to an earlier timed-out request discarded: %s",
                self.meter_label,
                _redact(reply.raw[:200]),
            )
            return
        if waiter is None:
            if cmd == RequestSamples.name and self._session is not None:
                logger.warning(
                    "%s: reqSamples refused by the firmware: %s", self.meter_label, reply.raw[:200]
                )
                return
            self.unmatched_replies += 1
            logger.warning(
                "%s: reply nobody waits for: %s", self.meter_label, _redact(reply.raw[:200])
            )
            return
        if waiter.on_reply is not None:
            waiter.on_reply(reply)  # before the waiter is released: it may read waiter.dump
        if waiter is loose:
            self._loose = None
        else:
            del self._waiters[waiter.name]
        if not waiter.future.done():
            waiter.future.set_result(reply)

    def _on_connection_lost(self, link: Link, reason: str) -> None:
        if link is not self._link:
            return
        self._link = None
        self._decoder = None
        expected = self._expect_drop or self._closing
        label = self.meter_label
        if self._overflow_seen:
            reason += "; the meter announced a ring-buffer overflow and reboots (§4.10)"
        if not self._closing:
            logger.warning("%s: connection lost: %s", label, reason)
        error = MeterConnectionError(label, f"connection lost ({reason})")
        for waiter in list(self._waiters.values()) + ([self._loose] if self._loose else []):
            if not waiter.future.done():
                waiter.future.set_exception(
                    MeterConnectionError(
                        label, f"connection lost while waiting for the reply to {waiter.name!r} ({reason})"
                    )
                )
        self._waiters.clear()
        self._loose = None
        for future in self._info_waiters + self._probe_waiters:
            if not future.done():
                future.set_exception(error)
        self._info_waiters.clear()
        self._probe_waiters.clear()
        for drop in self._drop_waiters:
            if not drop.done():
                drop.set_result(None)
        self._drop_waiters.clear()
        session = self._session
        if session is not None and session.active:
            self._session = None
            ended_by = "closed" if self._closing else "connection lost"
            session._finish(
                ended_by=ended_by,
                error=MeterConnectionError(
                    label,
                    f"sampling session ended: connection lost ({reason}); "
                    f"{session.received_samples} samples were received, the meter discards "
                    "the rest (§4.9)",
                ),
            )
        self._publish(ConnectionLost(label, reason, expected))
        if self.reconnect and not self._closing:
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(rebooted=True if (self._expect_drop or self._overflow_seen) else None)
            )

    async def _reconnect_loop(self, rebooted: bool | None) -> None:
        previous = self._info
        delay, max_delay = self.reconnect_backoff
        attempts = 0
        while not self._closing:
            attempts += 1
            await asyncio.sleep(delay)
            try:
                info = await self._establish(same_meter_as=previous)
            except MeterIdentityError as exc:
                self._refusal = exc.detail
                logger.error("%s: %s", self.meter_label, exc.detail)
                self._publish(ConnectionLost(self.meter_label, exc.detail, expected=False))
                return
            except MeterError as exc:
                logger.info(
                    "%s: reconnect attempt %d failed: %s", self.meter_label, attempts, exc.detail
                )
                delay = min(max_delay, delay * 2)
                continue
            self._start_background()
            if self._wanted_log_level is not None:
                with contextlib.suppress(MeterError):
                    await self.set_log_level(self._wanted_log_level)
            changes = _info_changes(previous, info)
            logger.info(
                "%s: reconnected after %d attempt(s); changed: %s",
                self.meter_label,
                attempts,
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()) or "nothing",
            )
            self._publish(Reconnected(self.meter_label, previous, info, changes, rebooted, attempts))
            return

    def _housekeeping_delay(self) -> float:
        """Sleep until the next keep-alive or liveness deadline (not a fixed tick: every
        wake-up of an otherwise idle loop costs CPU), at most ``HOUSEKEEPING_MAX_S``."""
        now = time.monotonic()
        due = min(self._last_tx + self.keepalive_s, self._last_rx + self.liveness_timeout_s)
        return min(HOUSEKEEPING_MAX_S, max(HOUSEKEEPING_MIN_S, due - now + HOUSEKEEPING_MIN_S))

    async def _keepalive_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._housekeeping_delay())
            link = self._link
            if link is None or link.is_closing:
                continue
            now = time.monotonic()
            if now - self._last_tx >= self.keepalive_s:
                try:
                    link.write(KEEPALIVE)
                    self._last_tx = now
                except (OSError, ConnectionError) as exc:
                    logger.info("%s: keep-alive failed: %s", self.meter_label, exc)
            session = self._session
            # Lifeness/rate logs reach connections at INFO or below (§2.6, §4.7); otherwise
            # only a session that is sending (not paused, no slots, §5) keeps the line busy.
            expect_traffic = self._log_level <= LogLevel.INFO or (
                session is not None and session.streaming
            )
            if expect_traffic and now - self._last_rx > self.liveness_timeout_s:
                logger.warning(
                    "%s: nothing received for %.1f s; declaring the connection dead",
                    self.meter_label,
                    now - self._last_rx,
                )
                link.abort()

    # ---------------------------------------------------------------- raw requests

    def _send(self, data: bytes) -> None:
        link = self._link
        if link is None or link.is_closing:
            raise MeterConnectionError(self.meter_label, self._refusal or "not connected")
        if link.receive_low_water > 1:
            self._drop_low_water(link)  # whatever answers must not wait for a full batch
        try:
            link.write(data)
        except (OSError, ConnectionError) as exc:
            raise MeterConnectionError(self.meter_label, f"send failed: {exc}") from exc
        self._last_tx = time.monotonic()

    def _encode(self, command: Command) -> bytes:
        try:
            return command.encode()
        except CommandError as exc:
            raise MeterCommandError(self.meter_label, str(exc)) from exc

    def _build(self, cls: type[_C], *args: Any, **kwargs: Any) -> _C:
        """Construct a codec command; its validation error becomes a MeterCommandError."""
        try:
            return cls(*args, **kwargs)
        except CommandError as exc:
            raise MeterCommandError(self.meter_label, str(exc)) from exc

    async def _await_reply(
        self, future: asyncio.Future[Any], what: str, timeout: float | None
    ) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise MeterTimeoutError(
                self.meter_label, f"no reply to {what!r} within {limit} s"
            ) from None

    async def request_reply(
        self,
        command: Command,
        *,
        timeout: float | None = None,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> Reply:
        """Send ``command`` and return its raw :class:`Reply` (matched as in the module doc).

        Only for commands with a JSON reply (``expects_reply``); use :meth:`request` for
        the typed view and error checks.
        """
        data = self._encode(command)
        name = command.name
        if not command.expects_reply:
            raise MeterCommandError(self.meter_label, f"{name!r} has no JSON reply to wait for")
        reliable = command.reply_cmd_reliable
        lock = self._locks.setdefault(name, asyncio.Lock()) if reliable else self._loose_lock
        async with lock:
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(command, future, on_reply)
            self._send(data)
            if reliable:
                self._waiters[name] = waiter
            else:
                self._loose = waiter
            logger.debug("%s: sent %s", self.meter_label, _describe(command))
            try:
                return await self._await_reply(future, name, timeout)  # type: ignore[no-any-return]
            except MeterTimeoutError:
                # Replies come in request order on a connection: if this one still arrives it
                # must not answer the next request of the same kind (no request ids, §2.8).
                key = name if reliable else _LOOSE
                self._stale[key] = self._stale.get(key, 0) + 1
                raise
            finally:
                if reliable and self._waiters.get(name) is waiter:
                    del self._waiters[name]
                elif not reliable and self._loose is waiter:
                    self._loose = None

    async def request(self, command: Command, *, timeout: float | None = None) -> ReplyView | None:
        """Send any codec command; return its typed reply view or raise a typed error.

        ``info`` returns :class:`DeviceInfo`; ``reqSamples`` and the restart family return
        None (they have no reply).  A failed command raises :class:`MeterBusyError` or
        :class:`MeterCommandRejected`.
        """
        if isinstance(command, Info):
            return await self.get_info(timeout=timeout)
        if isinstance(command, Sample):
            raise MeterCommandError(
                self.meter_label, "start sampling with sample(), which returns the session"
            )
        if isinstance(command, Stop):
            return await self.stop(timeout=timeout)
        if command.reboots:
            await self._reboot(command, timeout)
            return None
        if not command.expects_reply:
            self._send(self._encode(command))
            return None
        reply = await self.request_reply(command, timeout=timeout)
        return self._check(command, reply)

    def _view(self, command: Command, reply: Reply) -> ReplyView:
        try:
            return parse_reply(reply, command.name)
        except RemoteProtocolError as exc:
            raise MeterProtocolError(self.meter_label, f"reply to {command.name!r}: {exc}") from exc

    def _check(self, command: Command, reply: Reply) -> ReplyView:
        view = self._view(command, reply)
        if view.succeeded:
            return view
        message = _redact(view.message) if view.message is not None else None
        fields = {k: ("***" if k == "pwd" else v) for k, v in reply.fields.items()}
        kind = MeterBusyError if isinstance(view, BusyReply) else MeterCommandRejected
        raise kind(self.meter_label, command.name, message, fields)

    async def _typed(self, command: Command, kind: type[_V], timeout: float | None = None) -> _V:
        view = await self.request(command, timeout=timeout)
        if not isinstance(view, kind):
            raise MeterProtocolError(
                self.meter_label,
                f"reply to {command.name!r} is a {type(view).__name__}, expected {kind.__name__}",
            )
        return view

    async def _reboot(self, command: Command, timeout: float | None) -> None:
        data = self._encode(command)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drop_waiters.append(future)
        self._expect_drop = True
        if isinstance(command, FactoryReset):
            self._name_after_reboot = FactoryReset.FACTORY_NAME
        self._send(data)
        logger.info("%s: sent %s; the meter reboots", self.meter_label, command.name)
        await self._await_reply(future, f"{command.name} (connection drop)", timeout)

    # ------------------------------------------------------------ typed commands

    async def get_info(self, *, timeout: float | None = None) -> DeviceInfo:
        """Ask for the info line (§2.5) and return it; also updates :attr:`info`."""
        data = self._encode(Info())
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._info_waiters.append(future)
        self._send(data)
        try:
            reply = await self._await_reply(future, "info", timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._info_waiters.remove(future)
        return self._parse_info(reply)

    async def get_voltage(self) -> LineValues:
        """RMS voltage per line, V (§3.10)."""
        return await self._typed(self._build(GetVoltage), LineValues)

    async def get_current(self) -> LineValues:
        """RMS current per line, mA (§3.10)."""
        return await self._typed(self._build(GetCurrent), LineValues)

    async def get_power(self) -> PowerReading:
        """Active/reactive/'apparent' power per line (§3.10; apparent = reactive, §12 #9)."""
        return await self._typed(self._build(GetPower), PowerReading)

    async def get_energy(self) -> EnergyReading:
        """Energy per line since the last reset, Wh (§3.10; resets the ADE accumulators)."""
        return await self._typed(self._build(GetEnergy), EnergyReading)

    async def get_frequency(self) -> LineValues:
        """Line frequency per line, Hz (the firmware's ``getPeriod``, §12 #13)."""
        return await self._typed(self._build(GetPeriod), LineValues)

    async def get_phase_angle(self) -> LineValues:
        """Voltage-current phase angle per line, degrees (§3.10)."""
        return await self._typed(self._build(GetPhaseAngle), LineValues)

    async def set_name(self, name: str) -> MessageReply:
        """Rename the meter (§3.2; at most 19 bytes).  Re-reads the info line afterwards."""
        reply = await self._typed(self._build(SetName, name), MessageReply)
        with contextlib.suppress(MeterError):
            await self.get_info()
        return reply

    async def set_mqtt_server(self, server: str, *, timeout: float | None = None) -> MessageReply:
        """MQTT broker (§3.3; ``"-"`` disables).  The meter tries to connect before replying."""
        return await self._typed(self._build(SetMqttServer, server), MessageReply, timeout)

    async def set_stream_server(self, server: str) -> MessageReply:
        """Host the meter dials on port 54322 every 30 s (§3.4, §7.2; ``"-"`` unsets)."""
        return await self._typed(self._build(SetStreamServer, server), MessageReply)

    async def set_time_server(self, server: str, *, timeout: float | None = None) -> MessageReply:
        """NTP server (§3.5); the meter syncs (blocking) before replying."""
        return await self._typed(self._build(SetTimeServer, server), MessageReply, timeout)

    async def add_wifi(self, ssid: str, password: str = "") -> WifiReply:
        """Add a WiFi network (§3.6; the error flag is inverted).  The password is never logged."""
        return await self._typed(self._build(AddWifi, ssid, password), WifiReply)

    async def del_wifi(self, ssid: str) -> WifiReply:
        """Remove a WiFi network (§3.6)."""
        return await self._typed(self._build(DelWifi, ssid), WifiReply)

    async def ntp_sync(self, background: bool = False, *, timeout: float | None = None) -> NtpReply:
        """NTP sync (§3.7; inverted error flag).  ``background`` returns at once."""
        return await self._typed(self._build(NtpSync, background), NtpReply, timeout)

    async def set_calibration(self, factors: tuple[float, ...] | list[float]) -> MessageReply:
        """Calibration ``[v1,i1,v2,i2,v3,i3]`` (§3.8; stored, never applied)."""
        return await self._typed(self._build(SetCalibration, tuple(factors)), MessageReply)

    async def reset_energy(
        self, energy: tuple[float, float, float] | None = None, ts: int | None = None
    ) -> MessageReply:
        """Reset the energy counters (§3.9), optionally to ``energy`` Wh at unix time ``ts``."""
        return await self._typed(self._build(ResetEnergy, energy, ts), MessageReply)

    async def set_daily_restart(self, hour: int, minute: int) -> MessageReply:
        """Reboot daily at local ``hour:minute`` (§3.12); ``hour=-1`` disables."""
        return await self._typed(self._build(SetDailyRestart, hour, minute), MessageReply)

    async def set_log_level(self, level: LogLevel | str) -> LogLevelReply:
        """This connection's log level (§3.1; not persisted, re-applied on reconnect if it
        was given to the constructor)."""
        command = self._build(SetLogLevel, level)
        reply = await self._typed(command, LogLevelReply)
        self._log_level = command.level
        return reply

    async def get_log(self, *, timeout: float | None = None) -> list[str]:
        """The stored WARNING/ERROR log rows, oldest first (§3.14)."""
        holder: list[Reply | UnparsedReply | None] = []

        def keep_dump(_: Reply) -> None:
            loose = self._loose
            holder.append(loose.dump if loose is not None else None)

        reply = await self.request_reply(GetLog(), timeout=timeout, on_reply=keep_dump)
        self._check(GetLog(), reply)
        dump = holder[0] if holder else None
        if dump is None:
            raise MeterProtocolError(self.meter_label, "getLog reply came without the log dump")
        if isinstance(dump, Reply):
            view = self._view(GetLog(), dump)
            if isinstance(view, LogDump):
                return list(view.rows)
        try:
            return parse_log_dump(dump)
        except RemoteProtocolError as exc:
            raise MeterProtocolError(self.meter_label, f"getLog: {exc}") from exc

    async def clear_log(self) -> MessageReply:
        """Delete the stored log (§3.11)."""
        return await self._typed(self._build(ClearLog), MessageReply)

    async def ade9k_read(self, address: int, size: int = 32) -> int:
        """Read an ADE9000 register (§3.13)."""
        reply = await self._typed(self._build(Ade9kAccess, address, size), Ade9kReply)
        if reply.reg_value is None:
            raise MeterProtocolError(self.meter_label, "ade9k reply without regValue")
        return reply.reg_value

    async def ade9k_write(self, address: int, value: int, size: int = 32) -> Ade9kReply:
        """Write an ADE9000 register; the reply has the old and the re-read value (§3.13)."""
        return await self._typed(self._build(Ade9kAccess, address, size, value), Ade9kReply)

    async def restart(self, *, timeout: float | None = None) -> None:
        """Reboot the meter (§3.15); returns when the connection has dropped."""
        await self._reboot(Restart(), timeout)

    async def factory_reset(self, *, timeout: float | None = None) -> None:
        """Restore all defaults including the name, then reboot (§3.15)."""
        await self._reboot(FactoryReset(), timeout)

    async def basic_reset(self, *, timeout: float | None = None) -> None:
        """Restore defaults except the name, then reboot (§3.15)."""
        await self._reboot(BasicReset(), timeout)

    async def probe(self, *, timeout: float | None = None) -> None:
        """Send ``?``; returns when the meter answered ``Info:Setup done`` (§2.2)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probe_waiters.append(future)
        self._send(PROBE)
        await self._await_reply(future, "?", timeout)

    async def keepalive(self) -> None:
        """Send ``!`` now (no reply, §2.2)."""
        self._send(KEEPALIVE)

    async def cts(self, ready: bool) -> None:
        """Set ready-to-send (§5.1).  Prefer :meth:`SamplingSession.cts`, which also tracks
        the pause for :meth:`SamplingSession.buffer_fill_estimate`."""
        await self._typed(self._build(Cts, ready), MessageReply)

    async def request_samples(self, n: int) -> None:
        """``reqSamples`` for this connection's running session (§5.2); see
        :meth:`SamplingSession.request_samples`."""
        if self._session is None:
            raise MeterCommandError(
                self.meter_label, "reqSamples needs a running sampling session on this client"
            )
        await self._session.request_samples(n)

    async def stop(self, *, timeout: float | None = None) -> StopReply:
        """Send ``stop`` (§4.8) and return the reply.  Stops any session of the meter (also
        one started by another client, or the port-54322 stream); this client's own session
        is ended and reconciled as by :meth:`SamplingSession.stop`."""
        if self._session is not None:
            session = self._session
            await session.stop()
            assert session._stop_reply is not None
            return session._stop_reply
        command = Stop()
        view = self._check(command, await self.request_reply(command, timeout=timeout))
        assert isinstance(view, StopReply)
        return view

    # ------------------------------------------------------------------- sampling

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
        if self._session is not None and self._session.active:
            raise MeterCommandError(
                self.meter_label, "a sampling session is already running on this connection"
            )
        link = self._link
        if link is None:
            raise MeterConnectionError(self.meter_label, "not connected")
        if isinstance(config, Sample):
            wanted_port = config.port
            transport = config.transport
            start_time = config.start_time
        else:
            wanted_port = config.port
            try:
                transport = Transport(config.transport)
            except ValueError:
                raise MeterCommandError(
                    self.meter_label,
                    f"sample: transport={config.transport!r} is not allowed; allowed: "
                    + ", ".join(t.value for t in Transport if t is not Transport.FFMPEG),
                ) from None
            start_time = config.start_time
        problem = self._transport_problem(transport)
        if problem is None and not config.prefix and transport is not Transport.UDP:
            problem = (
                "prefix=False on a command connection cannot be framed (text lines interleave "
                "with the samples, §4.6, §4.12); use the raw stream (open_raw_stream) or UDP"
            )
        if problem is not None:
            raise MeterCommandError(self.meter_label, problem)
        if start_time is not None:
            try:
                check_start_window(start_time, time.time())
            except CommandError as exc:
                raise MeterCommandError(self.meter_label, str(exc)) from exc
        receiver: UdpReceiver | None = None
        if transport is Transport.UDP:
            try:
                receiver = await open_udp_receiver(
                    self.meter_label, link.peer_host, link.local_host, wanted_port or 0
                )
            except OSError as exc:
                raise MeterConnectionError(
                    self.meter_label, f"cannot bind UDP port {wanted_port or 0}: {exc}"
                ) from exc
        try:
            if isinstance(config, Sample):
                command = config if receiver is None else dataclasses.replace(config, port=receiver.port)
            else:
                try:
                    command = config.to_command(receiver.port if receiver else None)
                except CommandError as exc:
                    raise MeterCommandError(self.meter_label, str(exc)) from exc
            session = await self._start_session(command, receiver)
        except BaseException:
            if receiver is not None:
                receiver.close()
            raise
        return session

    def _transport_problem(self, transport: Transport) -> str | None:
        """Why this connection could not receive a session over ``transport`` (None: it can)."""
        if transport is Transport.MQTT:
            return (
                "MQTT sampling publishes one message per sample to the broker (§4.14); this "
                "client does not subscribe to MQTT -- use TCP, UDP or Serial"
            )
        if self._serial and transport is not Transport.SERIAL:
            return f"on a serial connection sample with transport Serial, not {transport.value}"
        if not self._serial and transport is Transport.SERIAL:
            return "Serial data goes to the USB port: use AsyncMeterClient.serial(device)"
        return None

    async def _start_session(self, command: Sample, receiver: UdpReceiver | None) -> SamplingSession:
        created: list[SamplingSession] = []

        def install(reply: Reply) -> None:
            # Runs inside dispatch, before the frames that follow the reply are routed.
            try:
                view = parse_reply(reply, "sample")
            except RemoteProtocolError:
                return
            if not isinstance(view, SampleReply) or not view.succeeded:
                return
            session = self._make_session(view, command, receiver)
            created.append(session)
            if receiver is None:
                self._session = session

        reply = await self.request_reply(command, on_reply=install)
        view = self._check(command, reply)
        if not created:
            raise MeterProtocolError(self.meter_label, f"unusable sample reply: {reply.raw}")
        assert isinstance(view, SampleReply)
        session = created[0]
        if receiver is None:
            self._start_batching(session)
        else:
            self._session = session
            decoder = DatagramDecoder(
                view.measures.values_per_sample, view.chunk_size, bool(view.prefix)
            )
            receiver.attach(lambda data: session._feed(decoder.receive_datagram(data)))
        logger.info(
            "%s: sampling %s at %d Hz over %s (chunk %d bytes)",
            self.meter_label,
            view.measures.name,
            view.sampling_rate,
            command.transport.value,
            view.chunk_size,
        )
        return session

    def _make_session(
        self, view: SampleReply, command: Sample, receiver: UdpReceiver | None
    ) -> SamplingSession:
        drain = None
        if receiver is not None:
            drain = self._udp_drainer(receiver)

        def ended(session: SamplingSession) -> None:
            if self._session is session:
                self._session = None
                self._stop_batching(self._link)
            if receiver is not None:
                receiver.close()

        async def send_stop(timeout: float | None = None) -> StopReply:
            reply = await self.request_reply(Stop(), timeout=timeout)
            stop_view = self._view(Stop(), reply)
            if not isinstance(stop_view, StopReply):
                raise MeterProtocolError(self.meter_label, f"unusable stop reply: {reply.raw}")
            if stop_view.was_idle:
                logger.warning(
                    "%s: stop: the meter says it was not sampling (session already ended)",
                    self.meter_label,
                )
            elif not stop_view.succeeded:
                raise MeterCommandRejected(self.meter_label, "stop", stop_view.message, reply.fields)
            # Frames the decoder still holds came before the reply; they are already routed.
            return stop_view

        async def send_cts(ready: bool) -> None:
            await self._typed(Cts(ready), MessageReply)

        async def send_request(n: int) -> None:
            self._send(self._encode(self._build(RequestSamples, n, view.measures)))

        session = SamplingSession(
            meter=self.meter_label,
            reply=view,
            transport=command.transport,
            send_stop=send_stop,
            send_cts=send_cts,
            send_request=send_request,
            drain=drain,
            on_end=ended,
        )
        return session

    def _udp_drainer(self, receiver: UdpReceiver) -> Callable[[], Awaitable[None]]:
        async def drain() -> None:
            # Datagrams still in flight when the TCP stop reply arrived (§4.8, §4.13).
            loop = asyncio.get_running_loop()
            start = loop.time()
            while loop.time() - start < UDP_DRAIN_MAX_S:
                await asyncio.sleep(0.05)
                last = receiver.last_datagram_at or start
                if loop.time() - last >= UDP_DRAIN_QUIET_S:
                    return

        return drain


def _info_changes(
    previous: DeviceInfo | None, current: DeviceInfo
) -> dict[str, tuple[Any, Any]]:
    """Fields of the info line that differ (``sys_time`` always does and is left out)."""
    if previous is None:
        return {}
    changes: dict[str, tuple[Any, Any]] = {}
    for field in dataclasses.fields(DeviceInfo):
        key = field.name
        if key in ("sys_time", "raw_fields", "message", "cmd", "succeeded"):
            continue
        before, after = getattr(previous, key), getattr(current, key)
        if before != after:
            changes[key] = (before, after)
    return changes
