"""A broker shared by many meters: routing by meter name, status, and broadcast (§8.2).

:class:`AsyncMqttBroker` puts the parts together: an :class:`MqttLink` (the connection),
a :class:`StatusBoard` (idle statuses), one :class:`AsyncMqttMeter` per name (commands and
sampling), and :meth:`AsyncMqttBroker.broadcast` on ``powermeter/cmd``.  A message is
routed by the ``<name>`` level of its topic; one that no meter object waits for may still
answer a broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from ...protocol import Command, RemoteProtocolError, Reply, ReplyView, Sample, parse_reply
from .._errors import MeterCommandError, MeterProtocolError, MeterTimeoutError
from ._link import MqttLink
from ._messages import (
    BROADCAST_TOPIC,
    NOT_OVER_MQTT,
    TOPIC_BASE,
    MeterStatus,
    mqtt_label,
    packet_fits,
    parse_status,
)
from ._meter import AsyncMqttMeter
from ._status import StatusBoard

logger = logging.getLogger(__name__)


@dataclass
class _Broadcast:
    command: Command
    replies: dict[str, Reply] = field(default_factory=dict)
    expect: frozenset[str] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class AsyncMqttBroker:
    """One connection to an MQTT broker shared by many meters.

    ``timeout`` bounds connects and replies.  After a lost connection it reconnects every
    ``reconnect_s`` until :meth:`close`; requests in flight then fail with
    :class:`MeterConnectionError` and sessions end as ``connection lost``.
    """

    def __init__(self, host: str, port: int = 1883, *, timeout: float = 5.0,
                 reconnect_s: float = 1.0, identifier: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        self.host, self.port = host, int(port)
        self.timeout = float(timeout)
        self.reconnect_s = float(reconnect_s)
        self.label = f"mqtt broker {host}:{self.port}"
        self._link = MqttLink(
            host, self.port,
            topics=(f"{TOPIC_BASE}/+/state/info", f"{TOPIC_BASE}/+/state/sample"),
            timeout=self.timeout, reconnect_s=self.reconnect_s,
            client_args={
                "identifier": identifier or f"smartmeter-ophyd-{os.getpid()}-{id(self):x}",
                "username": username, "password": password,
            },
            on_message=self._route, on_lost=self._lost,
        )
        self._board = StatusBoard(lambda name: mqtt_label(name, self.host, self.port),
                                  self.timeout)
        self.statuses: dict[str, MeterStatus] = self._board.statuses
        """The latest status per meter name."""
        self.sampling: dict[str, bool] = self._board.sampling
        """The last ``on``/``off`` (or idle status) per meter name."""
        self._meters: dict[str, AsyncMqttMeter] = {}
        self._broadcasts: list[_Broadcast] = []

    # -- lifecycle

    @property
    def connected(self) -> bool:
        return self._link.connected

    async def connect(self) -> None:
        """Connect and subscribe; raises :class:`MeterConnectionError` if the broker cannot
        be reached now (later losses are retried in the background)."""
        await self._link.connect()

    async def close(self) -> None:
        await self._link.close()

    async def __aenter__(self) -> AsyncMqttBroker:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _lost(self, exc: BaseException) -> None:
        for meter in self._meters.values():
            meter.connection_lost(exc)

    # -- meters

    def meter(self, name: str, *, timeout: float | None = None) -> AsyncMqttMeter:
        """The meter called ``name`` on this broker (one object per name)."""
        existing = self._meters.get(name)
        if existing is None:
            existing = self._meters[name] = AsyncMqttMeter(self, name, timeout)
        return existing

    async def publish(self, topic: str, payload: bytes, label: str) -> None:
        """Publish at QoS 0; errors name ``label`` (the meter, or this broker)."""
        await self._link.publish(topic, payload, label)

    # -- routing

    def _route(self, topic: str, payload: Any) -> None:
        received_at = time.time()
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != TOPIC_BASE or parts[2] != "state":
            return
        name, leaf = parts[1], parts[3]
        label = mqtt_label(name, self.host, self.port)
        if leaf == "sample":
            if data in (b"on", b"off"):
                self._board.switched(name, data == b"on")
                return
            try:
                status = parse_status(name, label, data, received_at)
            except MeterProtocolError as exc:
                logger.warning("%s", exc)
                return
            self._board.new_status(status)
        elif leaf == "info":
            text = data.decode("utf-8", "replace")
            try:
                fields = json.loads(text)
            except ValueError:
                logger.warning("%s: MQTT message is not JSON: %.120r", label, text)
                return
            if not isinstance(fields, dict):
                logger.warning("%s: MQTT message is not an object: %.120r", label, text)
                return
            meter = self._meters.get(name)
            if meter is not None:
                meter.on_info(fields, text, received_at)
            elif "values" not in fields:
                self.offer_broadcast(name, Reply(fields, text))

    # -- status

    def subscribe_status(self, callback: Callable[[MeterStatus], None], *,
                         meter: str | None = None) -> Callable[[], None]:
        """``callback(status)`` on the loop for each status (of ``meter``, or of all)."""
        return self._board.subscribe(callback, meter=meter)

    async def next_status(self, name: str, *, timeout: float | None = None) -> MeterStatus:
        """The next status of meter ``name`` (every ~5 s while idle, none while sampling)."""
        return await self._board.next_status(name, timeout=timeout)

    # -- broadcast

    def offer_broadcast(self, name: str, reply: Reply) -> None:
        """A meter's reply, to every broadcast waiting for one from it."""
        for pending in self._broadcasts:
            command = pending.command
            if name in pending.replies:
                continue
            if command.reply_cmd_reliable and reply.cmd != command.name:
                continue
            pending.replies[name] = reply
            if pending.expect is not None and pending.expect <= set(pending.replies):
                pending.done.set()

    async def broadcast(self, command: Command, *, window_s: float = 1.0,
                        expect: Collection[str] | None = None) -> dict[str, ReplyView]:
        """Send ``command`` to every meter on ``powermeter/cmd`` (§8.2) and return each
        meter's reply view by name, collected for ``window_s`` -- or until every meter in
        ``expect`` answered (:class:`MeterTimeoutError` names the missing ones).

        Views are not checked: look at ``view.succeeded`` per meter.
        """
        if isinstance(command, Sample) or command.name in NOT_OVER_MQTT:
            raise MeterCommandError(self.label, f"{command.name!r} cannot be broadcast over MQTT")
        payload = json.dumps(command.to_json(), separators=(",", ":")).encode()
        if not packet_fits(BROADCAST_TOPIC, payload):
            raise MeterCommandError(self.label, f"{command.name!r} exceeds 256 bytes (§8.3)")
        pending = _Broadcast(command, expect=frozenset(expect) if expect is not None else None)
        self._broadcasts.append(pending)
        try:
            await self.publish(BROADCAST_TOPIC, payload, self.label)
            if not command.expects_reply:
                return {}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.done.wait(), window_s)
        finally:
            self._broadcasts.remove(pending)
        if pending.expect is not None:
            missing = sorted(pending.expect - set(pending.replies))
            if missing:
                raise MeterTimeoutError(
                    self.label, f"no reply to broadcast {command.name!r} within {window_s} s "
                    f"from: {', '.join(missing)}")
        views: dict[str, ReplyView] = {}
        for name, reply in sorted(pending.replies.items()):
            try:
                views[name] = parse_reply(reply, command.name)
            except RemoteProtocolError as exc:
                logger.warning("%s: broadcast reply unusable: %s",
                               mqtt_label(name, self.host, self.port), exc)
        return views
