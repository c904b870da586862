"""Connect, keep alive, reconnect: the part of the client that owns the link.

:class:`ConnectionKeeper` opens the link, reads the info line (§2.1, §2.5; on serial it asks
for it, §4.12), checks that a reconnect reached the *same* meter, sends ``!`` keep-alives
(never ``?``, which answers with a line, §2.2; a duty of the loop's one
:class:`~._timer.LoopTimer`, not a task per meter) and declares the link dead when nothing
arrived for ``liveness_timeout_s`` while traffic is expected (an idle meter sends a lifeness
line every second to connections at level INFO or below, §2.6; a sampling meter logs its
rate every second, §4.7).  After a drop it reconnects with exponential backoff and jitter.

It hands a ready link to its host (the client) and hears from it when the link dropped;
requests, replies and sessions are the host's business.

Limits: the handshake reads at most the decoder's bound (about 64 KiB) on TCP before it
gives up on a peer that sends no info line; on serial (where whatever ran before is still
on the line) only the timeout bounds it, and the link's early queue bounds memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..protocol import (
    KEEPALIVE,
    DeviceInfo,
    Event,
    Info,
    InfoLine,
    LogLevel,
    LogLine,
    MeterConnection,
    RefusedLine,
    RemoteProtocolError,
    Reply,
    parse_reply,
)
from ._errors import (
    MeterConnectionError,
    MeterError,
    MeterIdentityError,
    MeterProtocolError,
    MeterTimeoutError,
)
from ._model import ConnectionLost, Reconnected, info_changes
from ._timer import LoopTimer
from ._transports import Link

logger = logging.getLogger(__name__)

HOUSEKEEPING_MIN_S = 0.02
HOUSEKEEPING_MAX_S = 2.0
HOUSEKEEPING_GRID_S = 0.25
"""Keep-alive and liveness deadlines are rounded up to multiples of this (or of a quarter of
the shorter period): they then fall on the read batcher's default ticks and share the loop's
wake-up instead of costing one of their own."""
BACKOFF_JITTER = 0.2
"""Each reconnect delay is drawn within +-20 % so that a fleet does not redial in step."""


class KeeperHost(Protocol):
    """What the keeper needs from the client it serves."""

    @property
    def meter_label(self) -> str: ...

    def link_ready(self, link: Link, connection: MeterConnection, rest: list[Event]) -> None:
        """A connected link with its info line read; ``rest`` came after the info line."""

    def expect_traffic(self) -> bool:
        """Whether silence on the link means it is dead (see the module docstring)."""

    def publish(self, event: ConnectionLost | Reconnected) -> None: ...

    async def after_reconnect(self) -> None:
        """Re-apply per-connection settings (the log level, §2.4)."""


def parse_info(label: str, reply: Reply) -> DeviceInfo:
    """The info line as a :class:`DeviceInfo`, or :class:`MeterProtocolError` naming ``label``."""
    try:
        view = parse_reply(reply, "info")
    except RemoteProtocolError as exc:
        raise MeterProtocolError(label, f"bad info line: {exc}") from exc
    assert isinstance(view, DeviceInfo)
    if not view.is_smartmeter:
        raise MeterProtocolError(
            label, f"the peer's info line says type {view.device_type!r}, not 'smartmeter'"
        )
    return view


class ConnectionKeeper:
    """Owns the link to one meter: connect, handshake, keep-alive, liveness, reconnect."""

    def __init__(
        self,
        host: KeeperHost,
        opener: Callable[[], Awaitable[Link]],
        *,
        serial: bool,
        where: str,
        timeout: float,
        keepalive_s: float,
        liveness_timeout_s: float,
        reconnect: bool,
        backoff: tuple[float, float],
    ) -> None:
        self._host = host
        self._opener = opener
        self.serial = serial
        self.where = where
        self.timeout = timeout
        self.keepalive_s = keepalive_s
        self.liveness_timeout_s = liveness_timeout_s
        self._grid = min(HOUSEKEEPING_GRID_S, keepalive_s / 4, liveness_timeout_s / 4)
        self.reconnect = reconnect
        self.backoff = backoff
        self.link: Link | None = None
        self.connection: MeterConnection | None = None
        self.info: DeviceInfo | None = None
        self.last_rx = 0.0
        self.last_tx = 0.0
        self.closing = False
        self.refusal: str | None = None
        """Why the keeper will not reconnect (it found another meter at the address)."""
        self.name_after_reboot: str | None = None
        """The name our own factoryReset gives the meter (a reconnect may find it renamed)."""
        self._reconnect_task: asyncio.Task[None] | None = None
        self._timer: LoopTimer | None = None

    @property
    def connected(self) -> bool:
        return self.link is not None and not self.link.is_closing

    # ----------------------------------------------------------------- connecting

    async def connect(self) -> DeviceInfo:
        """Connect and read the info line; raises the typed errors of the client."""
        self.closing = False
        info, rest = await self._establish(None)
        self._start(rest)
        return info

    async def _establish(self, same_meter_as: DeviceInfo | None) -> tuple[DeviceInfo, list[Event]]:
        label = self._host.meter_label
        try:
            link = await asyncio.wait_for(self._opener(), self.timeout)
        except TimeoutError:
            raise MeterTimeoutError(label, f"connect timed out after {self.timeout} s") from None
        except (OSError, ValueError) as exc:
            raise MeterConnectionError(label, f"cannot connect: {exc}") from exc
        except Exception as exc:  # pyserial's SerialException is not an OSError
            raise MeterConnectionError(label, f"cannot open: {exc}") from exc
        connection = MeterConnection(serial=self.serial)
        try:
            if self.serial:
                link.write(connection.send(Info()).data)
                self.last_tx = time.monotonic()
            reply, rest = await self._read_info_line(label, link, connection)
            info = parse_info(label, reply)
            if same_meter_as is not None and info.name not in (
                same_meter_as.name, self.name_after_reboot
            ):
                raise MeterIdentityError(
                    label,
                    f"{self.where} now answers as meter {info.name!r}, not "
                    f"{same_meter_as.name!r} (another meter took the address, or it was "
                    "renamed); not reconnecting, so no command reaches the wrong meter",
                )
        except BaseException:
            link.abort()
            await link.wait_closed()
            raise
        self.link, self.connection, self.info = link, connection, info
        self.name_after_reboot = None
        self.last_rx = time.monotonic()
        logger.info("%s: connected (firmware %s, state %s)", label, info.version, info.state)
        return info, rest

    async def _read_info_line(
        self, label: str, link: Link, connection: MeterConnection
    ) -> tuple[Reply, list[Event]]:
        """Read until the info line (TCP: the first line, §2.1; serial: we asked for it)."""
        deadline = time.monotonic() + self.timeout
        limit = connection.decoder.max_buffered_bytes
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
                raise MeterTimeoutError(label, f"connected but no info line within {self.timeout} s")
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
            connection.receive_data(data)
            events = connection.events()
            for index, event in enumerate(events):
                if isinstance(event, InfoLine):
                    return event.reply, events[index + 1 :]
                if isinstance(event, RefusedLine):
                    raise MeterProtocolError(
                        label, f"info line refused: {event.reason}: not a SmartMeter?"
                    )
                if self.serial or isinstance(event, LogLine):
                    continue  # serial: whatever ran before; TCP: a reconnect race (§2.1)
                raise MeterProtocolError(
                    label,
                    f"expected the info line first, got {type(event).__name__} "
                    f"(first bytes {bytes(head)!r}): not a SmartMeter?",
                )
            if not self.serial and received > limit:
                raise MeterProtocolError(
                    label,
                    f"no info line in the first {received} bytes (starting {bytes(head)!r}): "
                    "not a SmartMeter?",
                )

    def _start(self, rest: list[Event]) -> None:
        link, connection = self.link, self.connection
        assert link is not None and connection is not None
        self._host.link_ready(link, connection, rest)
        self._timer = LoopTimer.of(asyncio.get_running_loop())
        self._timer.add(self, self._on_grid(time.monotonic() + self._next_in()))

    # ------------------------------------------------------------------- sending

    def write(self, data: bytes) -> None:
        """Write ``data`` in one piece, or raise :class:`MeterConnectionError`."""
        link = self.link
        if link is None or link.is_closing:
            raise MeterConnectionError(self._host.meter_label, self.refusal or "not connected")
        try:
            link.write(data)
        except (OSError, ConnectionError) as exc:
            raise MeterConnectionError(self._host.meter_label, f"send failed: {exc}") from exc
        self.last_tx = time.monotonic()

    # ------------------------------------------------------------------ dropping

    def lost(self, link: Link) -> tuple[bool, bool]:
        """``link`` dropped: forget it and maybe reconnect.  Returns ``(expected, rebooted)``:
        whether we asked for it (reboot, close), and whether the meter said it reboots."""
        connection = self.connection
        expect_drop = connection is not None and connection.expect_drop
        overflow = connection is not None and connection.overflow_announced
        self.link = None
        self.connection = None
        if self._timer is not None:
            self._timer.remove(self)
        if self.reconnect and not self.closing:
            rebooted = True if (expect_drop or overflow) else None
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(rebooted), name=f"reconnect {self._host.meter_label}"
            )
        return expect_drop or self.closing, overflow

    async def close(self) -> None:
        """Stop the background tasks and close the link (its loss is reported as usual)."""
        self.closing = True
        if self._timer is not None:
            self._timer.remove(self)
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        link = self.link
        if link is not None:
            link.close()
            await link.wait_closed()
        self.link = None
        self._reconnect_task = None

    async def _reconnect_loop(self, rebooted: bool | None) -> None:
        host = self._host
        previous = self.info
        delay, max_delay = self.backoff
        attempts = 0
        while not self.closing:
            attempts += 1
            await asyncio.sleep(delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))
            try:
                info, rest = await self._establish(same_meter_as=previous)
            except MeterIdentityError as exc:
                self.refusal = exc.detail
                logger.error("%s: %s", host.meter_label, exc.detail)
                host.publish(ConnectionLost(host.meter_label, exc.detail, expected=False))
                return
            except MeterError as exc:
                logger.info(
                    "%s: reconnect attempt %d failed: %s", host.meter_label, attempts, exc.detail
                )
                delay = min(max_delay, delay * 2)
                continue
            self._start(rest)
            await host.after_reconnect()
            changes = info_changes(previous, info)
            logger.info(
                "%s: reconnected after %d attempt(s); changed: %s",
                host.meter_label,
                attempts,
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()) or "nothing",
            )
            host.publish(Reconnected(host.meter_label, previous, info, changes, rebooted, attempts))
            return

    # --------------------------------------------------------------- keep-alive

    def label(self) -> str:
        return self._host.meter_label

    def _next_in(self) -> float:
        """Seconds until the next keep-alive or liveness deadline, at most
        ``HOUSEKEEPING_MAX_S`` (a duty of the loop's one timer, not a task per meter)."""
        now = time.monotonic()
        due = min(self.last_tx + self.keepalive_s, self.last_rx + self.liveness_timeout_s)
        return min(HOUSEKEEPING_MAX_S, max(HOUSEKEEPING_MIN_S, due - now + HOUSEKEEPING_MIN_S))

    def tick(self, now: float) -> float:
        """Send a keep-alive when one is due; abort a link that went silent."""
        link = self.link
        if link is None or link.is_closing:
            return now + HOUSEKEEPING_MAX_S
        if now - self.last_tx >= self.keepalive_s:
            try:
                link.write(KEEPALIVE)  # §2.2
                self.last_tx = now
            except (OSError, ConnectionError) as exc:
                logger.info("%s: keep-alive failed: %s", self.label(), exc)
        if self._host.expect_traffic() and now - self.last_rx > self.liveness_timeout_s:
            logger.warning(
                "%s: nothing received for %.1f s; declaring the connection dead",
                self.label(),
                now - self.last_rx,
            )
            link.abort()
        return self._on_grid(now + self._next_in())

    def _on_grid(self, due: float) -> float:
        grid = self._grid
        return math.ceil(due / grid) * grid if grid > 0 else due


def quiet_level(serial: bool) -> LogLevel:
    """A fresh connection's log level: INFO on TCP, ALL on serial (§2.4)."""
    return LogLevel.ALL if serial else LogLevel.INFO
