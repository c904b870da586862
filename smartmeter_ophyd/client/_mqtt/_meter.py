"""One meter reached through an :class:`AsyncMqttBroker`, by name (protocol.md §8.2).

Commands go out on ``powermeter/<name>/cmd``; the broker hands this object what arrives on
the meter's ``state/info`` topic (:meth:`AsyncMqttMeter.on_info`).  A reply is matched by
its echoed ``cmd`` on a topic every client shares (§8.3), so one exchange per meter is in
flight at a time.  Commands MQTT cannot carry, and sampling starts whose reply would not
fit PubSubClient's 256-byte packet, are refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...protocol import (
    BusyReply,
    Command,
    Cts,
    RemoteProtocolError,
    Reply,
    ReplyView,
    Sample,
    SampleReply,
    Stop,
    StopReply,
    Transport,
    parse_reply,
)
from .._errors import (
    MeterBusyError,
    MeterCommandError,
    MeterCommandRejected,
    MeterConnectionError,
    MeterProtocolError,
    MeterTimeoutError,
)
from .._session import SamplingSession
from .._stop_reply import judge_stop_reply
from ._messages import (
    MAX_MQTT_RATE_HZ,
    NOT_OVER_MQTT,
    READINGS,
    MeterState,
    MeterStatus,
    MqttReading,
    expected_sample_reply,
    info_topic,
    meter_topic,
    mqtt_label,
    packet_fits,
    parse_reading,
)
from ._session import MqttSamplingSession

if TYPE_CHECKING:
    from ._broker import AsyncMqttBroker

logger = logging.getLogger(__name__)


@dataclass
class _Waiter:
    kind: str
    """``reply`` (a command), ``state`` or ``reading``."""
    command: Command | None
    future: asyncio.Future[Any]
    on_reply: Callable[[Reply], None] | None = None


class AsyncMqttMeter:
    """One meter reached through the broker, by its name (the MQTT topics, §8.2).

    Renaming a meter changes its topics only after its next MQTT reconnect (§3.2).
    """

    def __init__(self, broker: AsyncMqttBroker, name: str, timeout: float | None = None) -> None:
        if not name or "/" in name or "+" in name or "#" in name:
            raise ValueError(f"an MQTT meter name must be a plain topic level, not {name!r}")
        self.broker = broker
        self.name = name
        self.timeout = broker.timeout if timeout is None else timeout
        self.meter_label = mqtt_label(name, broker.host, broker.port)
        self._lock = asyncio.Lock()
        self._waiter: _Waiter | None = None
        self.session: MqttSamplingSession | None = None

    def __repr__(self) -> str:
        return f"<AsyncMqttMeter {self.meter_label}>"

    # -- what the broker routes here

    def on_info(self, fields: dict[str, Any], raw: str, received_at: float) -> None:
        waiter = self._waiter
        if "values" in fields and "unit" in fields and "ts" in fields:
            if self.session is not None and self.session.active:
                self.session.message(fields)
            else:
                logger.debug("%s: MQTT sample without a session of ours", self.meter_label)
            return
        if "sampleState" in fields:
            if waiter is not None and waiter.kind == "state" and not waiter.future.done():
                waiter.future.set_result(MeterState(
                    self.name, fields.get("sampleState") == "sampling", str(fields.get("ts")),
                    received_at))
            return
        if "value" in fields and "unit" in fields:
            if waiter is not None and waiter.kind == "reading" and not waiter.future.done():
                waiter.future.set_result((fields, received_at))
            return
        reply = Reply(fields, raw)
        self.broker.offer_broadcast(self.name, reply)
        if waiter is None or waiter.kind != "reply" or waiter.future.done():
            logger.debug("%s: MQTT reply nobody waits for: %.200s", self.meter_label, raw)
            return
        command = waiter.command
        assert command is not None
        if command.reply_cmd_reliable and reply.cmd != command.name:
            logger.debug("%s: reply to %r while waiting for %r (another client?)",
                         self.meter_label, reply.cmd, command.name)
            return
        if waiter.on_reply is not None:
            waiter.on_reply(reply)  # before the messages that follow are routed
        waiter.future.set_result(reply)

    def connection_lost(self, error: BaseException) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.future.done():
            waiter.future.set_exception(
                MeterConnectionError(self.meter_label, f"broker connection lost: {error}"))
        session = self.session
        if session is not None and session.active:
            session._finish(ended_by="connection lost",
                            error=MeterConnectionError(self.meter_label,
                                                       f"broker connection lost: {error}"))

    # -- requests

    async def _exchange(self, kind: str, topic: str, payload: bytes, command: Command | None,
                        timeout: float | None, on_reply: Callable[[Reply], None] | None = None,
                        what: str = "") -> Any:
        limit = self.timeout if timeout is None else timeout
        async with self._lock:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiter = _Waiter(kind, command, future, on_reply)
            try:
                await self.broker.publish(topic, payload, self.meter_label)
                try:
                    return await asyncio.wait_for(future, limit)
                except TimeoutError:
                    raise MeterTimeoutError(
                        self.meter_label,
                        f"no MQTT reply to {what or kind!r} within {limit} s (is the meter "
                        "connected to this broker? replies over 256 bytes are dropped, §8.3)",
                    ) from None
            finally:
                self._waiter = None

    def _command_payload(self, command: Command, topic: str) -> bytes:
        problem = NOT_OVER_MQTT.get(command.name)
        if problem is not None:
            raise MeterCommandError(self.meter_label, problem)
        payload = json.dumps(command.to_json(), separators=(",", ":")).encode()
        if not packet_fits(topic, payload):
            raise MeterCommandError(
                self.meter_label,
                f"{command.name!r} is {len(payload)} bytes: with topic {topic!r} it exceeds "
                "PubSubClient's 256-byte packet and the meter would ignore it (§8.3)",
            )
        return payload

    async def request(self, command: Command, *, timeout: float | None = None) -> ReplyView | None:
        """Send any codec command on ``…/cmd``; its typed reply, or a typed error.

        Commands without a reply (restart family) return None once published.  Start
        sampling with :meth:`sample`.
        """
        if isinstance(command, Sample):
            raise MeterCommandError(self.meter_label,
                                    "start MQTT sampling with sample(), which returns the session")
        topic = meter_topic(self.name, "cmd")
        payload = self._command_payload(command, topic)
        if not command.expects_reply:
            await self.broker.publish(topic, payload, self.meter_label)
            return None
        reply = await self._exchange("reply", topic, payload, command, timeout, what=command.name)
        return self._check(command, reply)

    def _check(self, command: Command, reply: Reply) -> ReplyView:
        try:
            view = parse_reply(reply, command.name)
        except RemoteProtocolError as exc:
            raise MeterProtocolError(self.meter_label, f"reply to {command.name!r}: {exc}") from exc
        if view.succeeded:
            return view
        kind = MeterBusyError if isinstance(view, BusyReply) else MeterCommandRejected
        raise kind(self.meter_label, command.name, view.message, dict(reply.fields))

    async def state(self, *, timeout: float | None = None) -> MeterState:
        """Ask ``…/state``: sampling or idle, and the meter's long local time (§8.2)."""
        result: MeterState = await self._exchange(
            "state", meter_topic(self.name, "state"), b"", None, timeout, what="state")
        return result

    async def reading(self, quantity: str = "p", *, timeout: float | None = None) -> MqttReading:
        """Ask ``…/sample`` for ``p`` (W), ``v`` (V), ``i`` (mA), ``q`` (var), ``s`` (VA) or
        ``e`` (kWh; read-with-reset on the meter, §12 #11) per line (§8.2)."""
        if quantity not in READINGS:
            raise MeterCommandError(
                self.meter_label,
                f"reading {quantity!r} is not known; allowed: {', '.join(READINGS)}")
        fields, received_at = await self._exchange(
            "reading", meter_topic(self.name, "sample"), quantity.encode(), None, timeout,
            what=f"sample {quantity}")
        return parse_reading(self.name, self.meter_label, quantity, fields, received_at)

    @property
    def status(self) -> MeterStatus | None:
        """The latest idle status received (None before the first, §8.2)."""
        return self.broker.statuses.get(self.name)

    @property
    def sampling(self) -> bool | None:
        """The last ``on``/``off`` seen (None before either)."""
        return self.broker.sampling.get(self.name)

    async def next_status(self, *, timeout: float | None = None) -> MeterStatus:
        """Wait for the next status (every ~5 s while the meter is idle, none while it
        samples, §8.3)."""
        return await self.broker.next_status(self.name, timeout=timeout)

    def subscribe_status(self, callback: Callable[[MeterStatus], None]) -> Callable[[], None]:
        """Call ``callback(status)`` on the loop for each status of this meter."""
        return self.broker.subscribe_status(callback, meter=self.name)

    def subscribe_logs(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """No log lines travel over MQTT; kept so a fly can use this meter like a TCP
        client (the per-sample messages are also logged to TCP clients, §4.14)."""
        return lambda: None

    # -- sampling

    async def sample(self, config: Any = None, /, **settings: Any) -> MqttSamplingSession:
        """Start MQTT sampling (§4.14) over ``…/cmd``; the session yields :class:`Block`.

        ``config`` is a codec ``Sample``, anything with ``to_command()`` (``SampleConfig``),
        or keywords (``rate``, ``measures``, ``flow_control``).  The transport is MQTT.
        """
        command = self._sample_command(config, settings)
        topic = meter_topic(self.name, "cmd")
        payload = self._command_payload(command, topic)
        expected = expected_sample_reply(command, self.name)
        if not packet_fits(info_topic(self.name), expected):
            raise MeterCommandError(
                self.meter_label,
                f"the meter's sample reply would be {len(expected)} bytes and exceed "
                "PubSubClient's 256-byte packet on its info topic, so it would never arrive "
                "(§8.3): use a shorter meter name, other measures, or start over TCP",
            )
        if self.session is not None and self.session.active:
            raise MeterCommandError(self.meter_label, "an MQTT session of this meter is running")
        created: list[MqttSamplingSession] = []

        def install(reply: Reply) -> None:
            try:
                view = parse_reply(reply, "sample")
            except RemoteProtocolError:
                return
            if isinstance(view, SampleReply) and view.succeeded:
                session = self._make_session(view)
                self.session = session
                created.append(session)

        reply = await self._exchange("reply", topic, payload, command, None, install, "sample")
        self._check(command, reply)
        if not created:
            raise MeterProtocolError(self.meter_label, f"unusable sample reply: {reply.raw}")
        return created[0]

    def _sample_command(self, config: Any, settings: dict[str, Any]) -> Sample:
        try:
            if config is None:
                settings.setdefault("transport", Transport.MQTT)
                command = Sample(**settings)
            elif settings:
                raise TypeError("give either a config or keyword settings, not both")
            elif isinstance(config, Sample):
                command = config
            else:
                command = config.to_command()
        except (ValueError, TypeError) as exc:
            raise MeterCommandError(self.meter_label, f"sample: {exc}") from exc
        problem = None
        if command.transport is not Transport.MQTT:
            problem = f"an MQTT session samples with transport MQTT, not {command.transport.value}"
        elif command.rate > MAX_MQTT_RATE_HZ:
            problem = (f"rate {command.rate} Hz is too high for MQTT sampling (one publish per "
                       f"sample, §4.14): at most {MAX_MQTT_RATE_HZ} Hz; use TCP or UDP")
        elif command.start_time is not None:
            problem = ("a scheduled start's reply carries a message that does not fit "
                       "PubSubClient's 256-byte packet (§6.4, §8.3); start MQTT sampling now")
        elif command.slot is not None:
            problem = "slot sending writes MQTT sessions to the TCP sink (§5.3, §12 #27)"
        if problem is not None:
            raise MeterCommandError(self.meter_label, problem)
        return command

    def _make_session(self, view: SampleReply) -> MqttSamplingSession:
        async def send_stop(timeout: float | None = None) -> StopReply:
            reply = await self._exchange("reply", meter_topic(self.name, "cmd"),
                                         self._command_payload(Stop(), meter_topic(self.name, "cmd")),
                                         Stop(), timeout, what="stop")
            # Same topic, same publisher: the tail came before this reply (§4.8, §4.14).
            return judge_stop_reply(self.meter_label, reply)

        async def send_cts(ready: bool) -> None:
            await self.request(Cts(ready))

        def ended(session: SamplingSession) -> None:
            if self.session is session:
                self.session = None

        return MqttSamplingSession(
            unit=view.measures.spec.unit_string,
            meter=self.meter_label,
            reply=view,
            transport=Transport.MQTT,
            send_stop=send_stop,
            send_cts=send_cts,
            send_request=None,
            on_end=ended,
        )
