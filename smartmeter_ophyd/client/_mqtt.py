"""The meters' MQTT side (protocol.md §8, §4.14): status, commands, broadcast, sampling.

One :class:`AsyncMqttBroker` is one connection (aiomqtt) to a broker that any number of
meters use.  It subscribes to ``powermeter/+/state/info`` and ``powermeter/+/state/sample``
and routes what arrives by meter name:

* the 5 s status (sent only while a meter is idle, §8.3) becomes a :class:`MeterStatus`
  with the host's receive time and the meter's own whole-second ``ts`` kept apart;
  ``on``/``off`` become the meter's sampling state;
* replies to :meth:`AsyncMqttMeter.request` (any command on ``…/cmd``),
  :meth:`AsyncMqttMeter.state` and :meth:`AsyncMqttMeter.reading`;
* :meth:`AsyncMqttBroker.broadcast` sends one command to every meter (``powermeter/cmd``)
  and collects one reply per meter;
* :meth:`AsyncMqttMeter.sample` is the MQTT sampling transport: the meter publishes one
  JSON message per sample (§4.14) and they come out of a :class:`SamplingSession` as the
  same :class:`Block` values as TCP sessions give, unnumbered (``packets`` empty, as for the
  raw stream: the firmware numbers nothing here).  ``stop`` returns the reconciled
  summary; samples lost by the broker (QoS 0) show up as ``unexplained``.

Firmware limits this module enforces or explains (§8.3): a reply is matched by its echoed
``cmd`` and comes on a topic every client shares, so one command per meter is in flight at
a time and another client commanding the same meter over MQTT may be mistaken for us;
PubSubClient drops packets over 256 bytes both ways, so commands that would not fit and
sampling starts whose reply would not fit are refused before sending, and a reply that
does not come says so; ``info``, ``getLog`` and ``log`` act on the meter's last TCP
client, not on MQTT, and are refused; MQTT sampling is for low rates only (at most
:data:`MAX_MQTT_RATE_HZ`), never scheduled and never in slots.

Limits: the broker connection reconnects every ``reconnect_s`` after a loss; requests in
flight then fail with :class:`MeterConnectionError`, sessions end as ``connection lost``.
aiomqtt connects from the loop's default executor.  Needs the ``mqtt`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np

from ..protocol import (
    BusyReply,
    Command,
    Cts,
    RemoteProtocolError,
    Reply,
    ReplyView,
    Sample,
    SampleReply,
    Samples,
    Stop,
    StopReply,
    Transport,
    arduino_json,
    chunk_size,
    parse_reply,
)
from ._errors import (
    MeterBusyError,
    MeterCommandError,
    MeterCommandRejected,
    MeterConnectionError,
    MeterProtocolError,
    MeterTimeoutError,
)
from ._session import SamplingSession

logger = logging.getLogger(__name__)

_R = TypeVar("_R")

TOPIC_BASE: Final = "powermeter"
BROADCAST_TOPIC: Final = f"{TOPIC_BASE}/cmd"
MAX_PACKET_BYTES: Final = 256
"""PubSubClient's packet buffer: longer packets are neither sent nor received (§8.3)."""
MAX_MQTT_RATE_HZ: Final = 50
"""Highest rate this module samples over MQTT: one publish per sample (§4.14)."""
READINGS: Final = {"p": "W", "v": "V", "i": "mA", "q": "var", "s": "VA", "e": "kWh"}
"""``…/sample`` requests and the unit of their reply (§8.2)."""
_NOT_OVER_MQTT: Final = {
    "info": "info over MQTT publishes nothing: the firmware writes the info line to its last "
            "TCP client (§8.3); ask over TCP",
    "getLog": "getLog over MQTT writes the log to the meter's last TCP client (§8.3); use TCP",
    "log": "log over MQTT sets the level of the meter's last TCP client, not of MQTT (§8.3)",
    "reqSamples": "reqSamples writes a frame to the meter's TCP sink (§5.2); use TCP",
}
_TS_PLACEHOLDER: Final = "0000000000.000"


def meter_topic(name: str, leaf: str) -> str:
    """``powermeter/<name>/<leaf>`` (§8.2)."""
    return f"{TOPIC_BASE}/{name}/{leaf}"


def info_topic(name: str) -> str:
    return meter_topic(name, "state/info")


def status_topic(name: str) -> str:
    return meter_topic(name, "state/sample")


def packet_fits(topic: str, payload: bytes) -> bool:
    """PubSubClient's check: 5 header bytes + 2 + topic + payload <= 256 (§8.3)."""
    return 5 + 2 + len(topic.encode()) + len(payload) <= MAX_PACKET_BYTES


# ------------------------------------------------------------------ parsed messages


@dataclass(frozen=True, slots=True)
class MeterStatus:
    """The idle status (§8.2): sums over L1-L3 (current also the neutral, §12 #10), the
    mean voltage, total energy, 2-decimal values.

    ``meter_ts`` is the meter's clock in whole unix seconds, None when it sent 0 (no NTP
    sync since boot, §6.1); ``received_at`` is the host's ``time.time()`` on arrival.
    :attr:`timestamp` prefers the meter's clock and :attr:`time_source` says which it is.
    """

    meter: str
    power_w: float
    energy_kwh: float
    current_a: float
    voltage_v: float
    meter_ts: int | None
    received_at: float

    @property
    def timestamp(self) -> float:
        return float(self.meter_ts) if self.meter_ts else self.received_at

    @property
    def time_source(self) -> str:
        return "meter" if self.meter_ts else "host"


@dataclass(frozen=True, slots=True)
class MeterState:
    """Reply on the ``state`` topic: sampling or not, and the meter's long local time."""

    meter: str
    sampling: bool
    meter_time: str
    received_at: float


@dataclass(frozen=True, slots=True)
class MqttReading:
    """Reply on the ``sample`` topic: three per-line values printed ``%.2f`` (§8.2).

    ``values`` are corrected for the firmware's ``e`` bug (L1 1 kWh low, §12 #12);
    ``raw_values`` are as published.  ``i`` is in mA.
    """

    meter: str
    quantity: str
    unit: str
    values: tuple[float, float, float]
    raw_values: tuple[float, float, float]
    meter_time: str
    received_at: float


def _label(name: str, host: str, port: int) -> str:
    return f"smartmeter {name} (mqtt {host}:{port})"


def parse_status(meter: str, label: str, payload: bytes, received_at: float) -> MeterStatus:
    """The status JSON (§8.2); :class:`MeterProtocolError` naming the meter if malformed."""
    try:
        fields = json.loads(payload)
        ts = int(fields["ts"])
        return MeterStatus(
            meter=meter,
            power_w=float(fields["power"]),
            energy_kwh=float(fields["energy"]),
            current_a=float(fields["current"]),
            voltage_v=float(fields["volt"]),
            meter_ts=ts if ts > 0 else None,
            received_at=received_at,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise MeterProtocolError(label, f"unusable MQTT status {payload[:120]!r}: {exc}") from None


def _reading(meter: str, label: str, quantity: str, fields: dict[str, Any],
             received_at: float) -> MqttReading:
    try:
        raw = tuple(float(v) for v in str(fields["value"]).split(","))
        unit = str(fields["unit"])
        meter_time = str(fields["ts"])
    except (KeyError, ValueError) as exc:
        raise MeterProtocolError(label, f"unusable MQTT reading {fields!r}: {exc}") from None
    if len(raw) != 3:
        raise MeterProtocolError(label, f"MQTT reading has {len(raw)} values, not 3: {fields!r}")
    triple = (raw[0], raw[1], raw[2])
    values = (raw[0] + 1.0, raw[1], raw[2]) if quantity == "e" and unit == "kWh" else triple
    return MqttReading(meter, quantity, unit, values, triple, meter_time, received_at)


def expected_sample_reply(command: Sample, name: str) -> bytes:
    """The meter's reply to ``command`` as it will be serialised (§4.4), with a
    placeholder start time of the real width: to check it fits 256 bytes before sending."""
    measures = command.measures
    fields: dict[str, Any] = {"error": False, "cmd": "sample"}
    fields.update(
        measures=measures.reported,
        chunksize=chunk_size(command.rate, measures.bytes_per_sample, Transport.TCP),
        samplingrate=command.rate,
        conn_type=command.transport.value,
        measurements=measures.values_per_sample,
        prefix=command.prefix,
        flowCtr=command.flow_control,
        unit=measures.spec.unit_string,
        startTs=_TS_PLACEHOLDER,
    )
    return arduino_json(fields).encode()


# ------------------------------------------------------------------ the MQTT session


class MqttSamplingSession(SamplingSession):
    """A :class:`SamplingSession` fed by the meter's per-sample messages (§4.14).

    ``publish_times`` holds, per received sample, the ``ts`` of its message: the meter's
    clock when it *published* the sample (not when it was sampled; ``0.0`` before the
    meter's first NTP sync).
    """

    def __init__(self, *, unit: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unit = unit
        self.publish_times: list[float] = []
        self.malformed_messages = 0

    def _message(self, fields: dict[str, Any]) -> None:
        values = fields.get("values")
        if (
            fields.get("unit") != self.unit
            or not isinstance(values, list)
            or len(values) != len(self.channels)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        ):
            self.malformed_messages += 1
            logger.warning("%s: MQTT sample message not usable, not counted as received: %.120r",
                           self.meter, fields)
            return
        try:
            self.publish_times.append(float(fields.get("ts", "nan")))
        except (TypeError, ValueError):
            self.publish_times.append(math.nan)
        row = np.asarray(values, dtype=np.float32).reshape(1, -1)
        self._feed([Samples(values=row)])


# ------------------------------------------------------------------ one meter


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
        self.meter_label = _label(name, broker.host, broker.port)
        self._lock = asyncio.Lock()
        self._waiter: _Waiter | None = None
        self.session: MqttSamplingSession | None = None

    def __repr__(self) -> str:
        return f"<AsyncMqttMeter {self.meter_label}>"

    # -- what the broker routes here

    def _on_info(self, fields: dict[str, Any], raw: str, received_at: float) -> None:
        waiter = self._waiter
        if "values" in fields and "unit" in fields and "ts" in fields:
            if self.session is not None and self.session.active:
                self.session._message(fields)
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
        self.broker._offer_broadcast(self.name, reply)
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

    def _connection_lost(self, error: BaseException) -> None:
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
                await self.broker._publish(topic, payload, self.meter_label)
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
        problem = _NOT_OVER_MQTT.get(command.name)
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
            await self.broker._publish(topic, payload, self.meter_label)
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
        return _reading(self.name, self.meter_label, quantity, fields, received_at)

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
            try:
                stop_view = parse_reply(reply, "stop")
            except RemoteProtocolError as exc:
                raise MeterProtocolError(self.meter_label, f"stop: {exc}") from exc
            if not isinstance(stop_view, StopReply):
                raise MeterProtocolError(self.meter_label, f"unusable stop reply: {reply.raw}")
            if stop_view.was_idle:
                logger.warning("%s: stop: the meter says it was not sampling", self.meter_label)
            # Same topic, same publisher: the tail came before this reply (§4.8, §4.14).
            return stop_view

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


# ------------------------------------------------------------------ the broker connection


@dataclass
class _Broadcast:
    command: Command
    replies: dict[str, Reply] = field(default_factory=dict)
    expect: frozenset[str] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class AsyncMqttBroker:
    """One connection to an MQTT broker shared by many meters (see the module docstring).

    ``timeout`` bounds connects and replies.  After a lost connection it reconnects every
    ``reconnect_s`` until :meth:`close`.
    """

    def __init__(self, host: str, port: int = 1883, *, timeout: float = 5.0,
                 reconnect_s: float = 1.0, identifier: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        try:
            import aiomqtt
        except ImportError as exc:
            raise RuntimeError(
                "MQTT needs aiomqtt: pip install 'smartmeter-ophyd[mqtt]'") from exc
        self._aiomqtt = aiomqtt
        self.host, self.port = host, int(port)
        self.timeout = float(timeout)
        self.reconnect_s = float(reconnect_s)
        self.label = f"mqtt broker {host}:{self.port}"
        self._client_args: dict[str, Any] = {
            "identifier": identifier or f"smartmeter-ophyd-{os.getpid()}-{id(self):x}",
            "username": username, "password": password, "timeout": self.timeout,
        }
        self._client: Any = None
        self._meters: dict[str, AsyncMqttMeter] = {}
        self.statuses: dict[str, MeterStatus] = {}
        self.sampling: dict[str, bool] = {}
        self._status_callbacks: list[tuple[str | None, Callable[[MeterStatus], None]]] = []
        self._status_waiters: dict[str, list[asyncio.Future[MeterStatus]]] = {}
        self._broadcasts: list[_Broadcast] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False

    # -- lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> None:
        """Connect and subscribe; raises :class:`MeterConnectionError` if the broker cannot
        be reached now (later losses are retried in the background)."""
        if self._task is not None:
            return
        try:
            await self._open()
        except self._aiomqtt.MqttError as exc:
            raise MeterConnectionError(self.label, f"cannot connect: {exc}") from exc
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.label)

    async def _open(self) -> None:
        # A fresh client per connection: aiomqtt keeps the old CONNACK future after a loss.
        self._client = self._aiomqtt.Client(self.host, self.port, **self._client_args)
        await self._client.__aenter__()
        try:
            await self._client.subscribe(f"{TOPIC_BASE}/+/state/info")
            await self._client.subscribe(f"{TOPIC_BASE}/+/state/sample")
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
            raise
        self._connected.set()
        logger.info("%s: connected", self.label)

    async def _run(self) -> None:
        aiomqtt = self._aiomqtt
        while not self._closing:
            try:
                async for message in self._client.messages:
                    self._route(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                self._lost(exc)
                with contextlib.suppress(Exception):
                    await self._client.__aexit__(None, None, None)
            while not self._closing:
                await asyncio.sleep(self.reconnect_s)
                try:
                    await self._open()
                    break
                except aiomqtt.MqttError as exc:
                    logger.debug("%s: reconnect failed: %s", self.label, exc)

    def _lost(self, exc: BaseException) -> None:
        self._connected.clear()
        logger.warning("%s: connection lost (%s); reconnecting every %.1f s",
                       self.label, exc, self.reconnect_s)
        for meter in self._meters.values():
            meter._connection_lost(exc)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._connected.is_set():
            self._connected.clear()
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)

    async def __aenter__(self) -> AsyncMqttBroker:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- meters

    def meter(self, name: str, *, timeout: float | None = None) -> AsyncMqttMeter:
        """The meter called ``name`` on this broker (one object per name)."""
        existing = self._meters.get(name)
        if existing is None:
            existing = self._meters[name] = AsyncMqttMeter(self, name, timeout)
        return existing

    async def _publish(self, topic: str, payload: bytes, label: str) -> None:
        if not self._connected.is_set():
            raise MeterConnectionError(label, f"not connected to {self.label}")
        try:
            await self._client.publish(topic, payload, qos=0)
        except self._aiomqtt.MqttError as exc:
            raise MeterConnectionError(label, f"publish to {topic!r} failed: {exc}") from exc

    # -- routing

    def _route(self, topic: str, payload: Any) -> None:
        received_at = time.time()
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != TOPIC_BASE or parts[2] != "state":
            return
        name, leaf = parts[1], parts[3]
        label = _label(name, self.host, self.port)
        if leaf == "sample":
            if data in (b"on", b"off"):
                self.sampling[name] = data == b"on"
                return
            try:
                status = parse_status(name, label, data, received_at)
            except MeterProtocolError as exc:
                logger.warning("%s", exc)
                return
            self._new_status(status)
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
                meter._on_info(fields, text, received_at)
            elif "values" not in fields:
                self._offer_broadcast(name, Reply(fields, text))

    def _new_status(self, status: MeterStatus) -> None:
        self.statuses[status.meter] = status
        self.sampling[status.meter] = False  # only sent while idle (§8.3)
        for future in self._status_waiters.pop(status.meter, []):
            if not future.done():
                future.set_result(status)
        for meter, callback in list(self._status_callbacks):
            if meter is None or meter == status.meter:
                try:
                    callback(status)
                except Exception:
                    logger.exception("%s: status subscriber failed", self.label)

    def subscribe_status(self, callback: Callable[[MeterStatus], None], *,
                         meter: str | None = None) -> Callable[[], None]:
        """``callback(status)`` on the loop for each status (of ``meter``, or of all)."""
        entry = (meter, callback)
        self._status_callbacks.append(entry)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._status_callbacks.remove(entry)

        return unsubscribe

    async def next_status(self, name: str, *, timeout: float | None = None) -> MeterStatus:
        limit = self.timeout if timeout is None else timeout
        future: asyncio.Future[MeterStatus] = asyncio.get_running_loop().create_future()
        self._status_waiters.setdefault(name, []).append(future)
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise MeterTimeoutError(
                _label(name, self.host, self.port),
                f"no MQTT status within {limit} s (sent every ~5 s, only while idle, §8.3)",
            ) from None

    # -- broadcast

    def _offer_broadcast(self, name: str, reply: Reply) -> None:
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
        if isinstance(command, Sample) or command.name in _NOT_OVER_MQTT:
            raise MeterCommandError(self.label, f"{command.name!r} cannot be broadcast over MQTT")
        payload = json.dumps(command.to_json(), separators=(",", ":")).encode()
        if not packet_fits(BROADCAST_TOPIC, payload):
            raise MeterCommandError(self.label, f"{command.name!r} exceeds 256 bytes (§8.3)")
        pending = _Broadcast(command, expect=frozenset(expect) if expect is not None else None)
        self._broadcasts.append(pending)
        try:
            await self._publish(BROADCAST_TOPIC, payload, self.label)
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
                               _label(name, self.host, self.port), exc)
        return views


# ------------------------------------------------------------------ blocking facade


class MqttBroker:
    """:class:`AsyncMqttBroker` for plain code, on the process's shared client loop."""

    def __init__(self, host: str, port: int = 1883, **kwargs: Any) -> None:
        from ._sync import SharedLoop

        self._thread = SharedLoop.acquire()
        self._released = False

        async def build() -> AsyncMqttBroker:
            broker = AsyncMqttBroker(host, port, **kwargs)
            await broker.connect()
            return broker

        try:
            self.async_broker = self._run(build(), "connect")
        except BaseException:
            self._release()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._thread.loop

    def _run(self, coro: Coroutine[Any, Any, _R], what: str, timeout: float | None = None) -> _R:
        limit = (timeout if timeout is not None else 5.0) + 1.0
        return self._thread.run(coro, limit, what, lambda: f"mqtt broker ({what})")

    def request(self, meter: str, command: Command, *, timeout: float | None = None
                ) -> ReplyView | None:
        m = self.async_broker.meter(meter)
        return self._run(m.request(command, timeout=timeout), command.name,
                         m.timeout if timeout is None else timeout)

    def broadcast(self, command: Command, *, window_s: float = 1.0,
                  expect: Collection[str] | None = None) -> dict[str, ReplyView]:
        return self._run(self.async_broker.broadcast(command, window_s=window_s, expect=expect),
                         "broadcast", window_s)

    def state(self, meter: str, *, timeout: float | None = None) -> MeterState:
        m = self.async_broker.meter(meter)
        return self._run(m.state(timeout=timeout), "state", m.timeout if timeout is None else timeout)

    def reading(self, meter: str, quantity: str = "p", *, timeout: float | None = None) -> MqttReading:
        m = self.async_broker.meter(meter)
        return self._run(m.reading(quantity, timeout=timeout), "reading",
                         m.timeout if timeout is None else timeout)

    def next_status(self, meter: str, *, timeout: float | None = None) -> MeterStatus:
        limit = self.async_broker.timeout if timeout is None else timeout
        return self._run(self.async_broker.next_status(meter, timeout=limit), "status", limit)

    def status(self, meter: str) -> MeterStatus | None:
        return self.async_broker.statuses.get(meter)

    def subscribe_status(self, callback: Callable[[MeterStatus], None], *,
                         meter: str | None = None) -> Callable[[], None]:
        """``callback`` runs on the loop thread."""
        return self._thread.call(lambda: self.async_broker.subscribe_status(callback, meter=meter))

    def _release(self) -> None:
        if not self._released:
            self._released = True
            from ._sync import SharedLoop

            SharedLoop.release(self._thread)

    def close(self) -> None:
        if self._released:
            return
        try:
            self._run(self.async_broker.close(), "close")
        finally:
            self._release()

    def __enter__(self) -> MqttBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BROADCAST_TOPIC",
    "MAX_MQTT_RATE_HZ",
    "AsyncMqttBroker",
    "AsyncMqttMeter",
    "MeterState",
    "MeterStatus",
    "MqttBroker",
    "MqttReading",
    "MqttSamplingSession",
    "expected_sample_reply",
    "info_topic",
    "meter_topic",
    "parse_status",
    "status_topic",
]
