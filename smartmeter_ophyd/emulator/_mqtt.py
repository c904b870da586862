"""The emulated meter's MQTT client (protocol.md §8, §4.14), as the firmware's stack behaves.

The firmware talks MQTT through PubSubClient wrapped in ``simpleMQTT``; this module
reproduces that pair over a real broker connection, with a small MQTT 3.1.1 codec of its own
(QoS 0 only, like PubSubClient's publishes), so the limits are the firmware's:

* client id = the device name, no credentials, keep-alive 15 s, clean session, port 1883
  (``EmulatorConfig.mqtt_port`` overrides the port for tests);
* the 256-byte packet buffer: a publication whose packet would exceed it is silently not
  sent, an incoming one is ignored (§8.3);
* one incoming packet is handled per pass of the main loop (``PubSubClient::loop``);
* a connect attempt blocks the meter's loop (boot and ``mqttServer``, §3.3, §8.1); when the
  first attempt fails, or a connection is lost, a background task retries every 1 s until
  it succeeds and logs nothing while it fails.  Only the boot path logs
  ``Cannot connect to MQTT Server <s>`` (also for ``-``, which is never tried);
* topics are built on (re)connect from the name at that time (a rename takes effect at
  the next connect, §3.2).

The meter side (§8.2): the 5 s status while idle, ``on``/``off`` when a session starts and
stops, the ``cmd``/``state``/``sample`` topics of ``powermeter/+`` and
``powermeter/<name>/+`` (only the last level is looked at), and MQTT sampling: every pass
publishes every whole sample in the ring buffer as one JSON message on ``…/state/info``
and logs it at INFO (§4.14).

Deviations (also in the package docstring): a ``cmd`` payload that is not valid JSON logs
the firmware's ``deserializeJson() failed`` error and publishes the plain JSON-format-error
reply; the firmware answers from its stale documents, so its reply may also carry keys of
the previous one (§8.3).  Numbers are printed by the project's ArduinoJson rules
(:func:`smartmeter_ophyd.protocol.arduino_json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from smartmeter_ophyd.protocol import (
    JsonInput,
    LogLevel,
    MalformedInput,
    arduino_json,
)

from . import _texts as texts

if TYPE_CHECKING:
    from ._endpoints import Endpoint
    from ._meter import EmulatedMeter
    from ._model import Session

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 1883
KEEPALIVE_S: Final = 15
"""PubSubClient's MQTT_KEEPALIVE."""
MAX_PACKET_BYTES: Final = 256
"""PubSubClient's MQTT_MAX_PACKET_SIZE: bigger packets are neither sent nor received (§8.3)."""
MAX_HEADER_BYTES: Final = 5
RETRY_S: Final = 1.0
"""simpleMQTT's reconnect task period (_MQTT_UPDATE_INTERVAL)."""
CONNECT_TIMEOUT_S: Final = 3.0
"""arduino-esp32 WiFiClient's default connect timeout."""
CONNACK_TIMEOUT_S: Final = 15.0
"""PubSubClient's MQTT_SOCKET_TIMEOUT."""
COMMAND_MAX_SIZE: Final = 600

TOPIC_BASE: Final = "powermeter"
LEAF_CMD: Final = "cmd"
LEAF_STATE: Final = "state"
LEAF_SAMPLE: Final = "sample"

# Texts of §8 (kept here: only this module emits them).
CONNECTED: Final = "MQTT connected to {server}"
DISCONNECTED: Final = "MQTT disconnected from {server}"
SUBSCRIBING: Final = "Subscribing to: {topic}"
MSG_ON_TOPIC: Final = "MQTT msg on topic: {topic}: {payload}"
WANTS_SAMPLE: Final = "MQTT wants sample"

# ------------------------------------------------------------------ MQTT 3.1.1 codec

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
SUBSCRIBE: Final = 8
SUBACK: Final = 9
PINGREQ_TYPE: Final = 12
PINGRESP: Final = 13
PINGREQ: Final = b"\xc0\x00"
DISCONNECT: Final = b"\xe0\x00"


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def connect_packet(client_id: str, keepalive_s: int = KEEPALIVE_S) -> bytes:
    """CONNECT, protocol level 4, clean session, no will, no credentials."""
    variable = _string(b"MQTT") + bytes([4, 0x02]) + keepalive_s.to_bytes(2, "big")
    return _packet(CONNECT << 4, variable + _string(client_id.encode()))


def subscribe_packet(packet_id: int, topic: str) -> bytes:
    return _packet((SUBSCRIBE << 4) | 0x02, packet_id.to_bytes(2, "big") + _string(topic.encode()) + b"\x00")


def publish_packet(topic: str, payload: bytes, *, retain: bool = False) -> bytes:
    """A QoS-0 PUBLISH."""
    return _packet((PUBLISH << 4) | int(retain), _string(topic.encode()) + payload)


def publish_fits(topic: str, payload: bytes) -> bool:
    """PubSubClient::publish's size check (§8.3)."""
    return MAX_HEADER_BYTES + 2 + len(topic.encode()) + len(payload) <= MAX_PACKET_BYTES


@dataclass(frozen=True, slots=True)
class Packet:
    kind: int
    flags: int
    body: bytes
    size: int
    """Bytes of the whole packet on the wire (fixed header included)."""

    def publish(self) -> tuple[str, bytes]:
        """Topic and payload of a PUBLISH (QoS > 0 carries a packet id after the topic)."""
        length = int.from_bytes(self.body[:2], "big")
        topic = self.body[2 : 2 + length].decode("utf-8", "replace")
        start = 2 + length + (2 if (self.flags >> 1) & 0x03 else 0)
        return topic, self.body[start:]


class PacketReader:
    """Splits a byte stream into MQTT packets (sans-I/O)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self._buffer += data
        packets: list[Packet] = []
        while True:
            packet = self._next()
            if packet is None:
                return packets
            packets.append(packet)

    def _next(self) -> Packet | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length = 0
        multiplier = 1
        i = 1
        while True:
            if i >= len(buf):
                return None
            byte = buf[i]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not byte & 0x80:
                break
            if i > 4:
                raise ValueError("malformed MQTT remaining length")
        if len(buf) < i + length:
            return None
        packet = Packet(buf[0] >> 4, buf[0] & 0x0F, bytes(buf[i : i + length]), i + length)
        del buf[: i + length]
        return packet


# ------------------------------------------------------------------ one broker connection


class _BrokerLink:
    """A TCP connection to the broker after a successful CONNECT/CONNACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_input: Callable[[], None]) -> None:
        self.reader = reader
        self.writer = writer
        self.packets: deque[Packet] = deque()
        self.alive = True
        self._on_input = on_input
        self._codec = PacketReader()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, host: str, port: int, client_id: str,
                   on_input: Callable[[], None]) -> _BrokerLink | None:
        """PubSubClient::connect: TCP, CONNECT, wait for CONNACK rc 0.  None on failure."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError, UnicodeError) as exc:
            logger.debug("mqtt %s:%s: connect failed: %r", host, port, exc)
            return None
        try:
            writer.write(connect_packet(client_id))
            codec = PacketReader()
            packets: list[Packet] = []
            async with asyncio.timeout(CONNACK_TIMEOUT_S):
                while not packets:
                    data = await reader.read(4096)
                    if not data:
                        raise ConnectionError("closed before CONNACK")
                    packets = codec.feed(data)
            first = packets[0]
            if first.kind != CONNACK or len(first.body) < 2 or first.body[1] != 0:
                raise ConnectionError(f"refused: {first!r}")
        except (OSError, TimeoutError, ValueError) as exc:
            logger.debug("mqtt %s:%s: handshake failed: %r", host, port, exc)
            writer.transport.abort()
            return None
        link = cls(reader, writer, on_input)
        link._codec = codec
        link.packets.extend(packets[1:])
        return link

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(4096)
                if not data:
                    break
                self.packets.extend(self._codec.feed(data))
                self._on_input()
        except (OSError, ValueError) as exc:
            logger.debug("mqtt link lost: %r", exc)
        self.alive = False
        self._on_input()

    def write(self, data: bytes) -> None:
        if self.alive and not self.writer.is_closing():
            self.writer.write(data)

    def close(self, *, graceful: bool) -> None:
        """``graceful``: DISCONNECT first (PubSubClient::disconnect); else as a reboot would."""
        if graceful:
            self.write(DISCONNECT)
        self.alive = False
        self._task.cancel()
        if graceful:
            self.writer.close()
        else:
            self.writer.transport.abort()


# ------------------------------------------------------------------ the meter's client


def _round2(value: float, *, of_float: bool) -> float:
    """``round2<float>``: ``(int)(value * 100 + 0.5) / 100.0`` stored as a float32 (§8.2).

    ``of_float``: the argument is a C ``float`` (the product is then taken in float);
    otherwise a ``double`` (the firmware divides by ``1000.0`` first for kWh and A).
    """
    if of_float:
        scaled = float(np.float32(value) * np.float32(100)) + 0.5
    else:
        scaled = value * 100 + 0.5
    return float(np.float32(int(scaled) / 100.0))


def _sum32(values: Any) -> float:
    """L1 + L2 + L3 summed in float32, as the firmware adds its float readings."""
    total = np.float32(0.0)
    for value in list(values)[:3]:
        total = np.float32(total + np.float32(value))
    return float(total)


class MeterMqtt:
    """simpleMQTT + PubSubClient of one emulated meter, and the firmware's MQTT duties.

    Driven by the meter's loop: :meth:`begin` at boot, :meth:`update` every pass,
    :meth:`on_idle` in the idle duties, :meth:`sampling_changed` from ``sampleCB``,
    :meth:`drop` at reboot.  The reconnect task runs beside the loop, as on the ESP's
    other core.
    """

    def __init__(self, meter: EmulatedMeter) -> None:
        self.meter = meter
        self._link: _BrokerLink | None = None
        self._connected = False
        """simpleMQTT's ``_connected`` (PubSubClient's own state is ``_link.alive``)."""
        self._retry: asyncio.Task[None] | None = None
        self._last_status = time.monotonic()
        self._last_in = self._last_out = 0.0
        self._ping_outstanding = False
        self._packet_id = 0
        self.topic_info = ""
        self.topic_sample = ""
        self.published = 0
        """Publications handed to the broker connection (test ground truth)."""
        self.refused = 0
        """Publications PubSubClient refused (not connected, or over 256 bytes)."""

    # ------------------------------------------------------------------ state

    @property
    def server(self) -> str:
        """The stored server: simpleMQTT keeps a pointer to the config's buffer (§3.3)."""
        return self.meter.stored.mqtt_server

    @property
    def port(self) -> int:
        return self.meter.config.mqtt_port

    def _client_connected(self) -> bool:
        return self._link is not None and self._link.alive

    def connected(self) -> bool:
        """MQTT::connected(): notices a lost connection (log, reconnect task) first."""
        if self._connected and not self._client_connected():
            self._disconnect(notify=True)
            self._start_retry()
        return self._client_connected()

    # ------------------------------------------------------------------ lifecycle

    async def begin(self) -> None:
        """onNetworkConnect: one blocking attempt; the boot logs a failure (§8.1)."""
        self._last_status = time.monotonic()
        if not await self.connect():
            self.meter.log(LogLevel.ERROR, texts.MQTT_CANNOT_CONNECT.format(server=self.server))

    async def connect(self) -> bool:
        """MQTT::connect(): refused while a reconnect task runs or for ``-``; else one
        blocking attempt and, on failure, the reconnect task."""
        if self._retry is not None and not self._retry.done():
            return False
        if self.server == texts.UNSET:
            return False
        if await self._connect_once():
            return True
        self._start_retry()
        return False

    async def set_server(self) -> None:
        """``mqttServer`` (§3.3): disconnect (its log names the new server), re-init, connect."""
        was = self._client_connected()
        self._disconnect(notify=was)
        await self.connect()

    async def stop(self) -> None:
        """The emulator's own end (not a reboot): :meth:`drop`, then wait for the reconnect
        task to end (an attempt under way finishes its name lookup first)."""
        retry = self._retry
        self.drop()
        if retry is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await retry

    def drop(self) -> None:
        """A reboot: the socket dies without DISCONNECT, the reconnect task ends."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._link is not None:
            self._link.close(graceful=False)
            self._link = None
        self._connected = False
        self.topic_info = self.topic_sample = ""

    async def _connect_once(self) -> bool:
        """MQTT::_connect(): on success set connected, log and subscribe (onMQTTConnect)."""
        if self._client_connected():
            return True
        server = self.server
        if server == texts.UNSET:
            return False
        name = self.meter.name
        link = await _BrokerLink.open(server, self.port, name, self.meter._wake.set)
        if link is None:
            return False
        self._link = link
        self._connected = True
        self._last_in = self._last_out = time.monotonic()
        self._ping_outstanding = False
        self.meter.log(LogLevel.INFO, CONNECTED.format(server=self.server))
        self._subscribe(name)
        return True

    def _subscribe(self, name: str) -> None:
        """mqttSubscribe (§8.2): the topics are built from the name at connect time."""
        for topic in (f"{TOPIC_BASE}/+", f"{TOPIC_BASE}/{name}/+"):
            self.meter.log(LogLevel.INFO, SUBSCRIBING.format(topic=topic))
            self._packet_id = self._packet_id % 0xFFFF + 1
            self._write(subscribe_packet(self._packet_id, topic))
        self.topic_sample = f"{TOPIC_BASE}/{name}/state/sample"
        self.topic_info = f"{TOPIC_BASE}/{name}/state/info"

    def _disconnect(self, *, notify: bool) -> None:
        if self._link is not None:
            self._link.close(graceful=self._link.alive)
            self._link = None
        self._connected = False
        if notify:
            self.meter.log(LogLevel.INFO, DISCONNECTED.format(server=self.server))

    def _start_retry(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.get_running_loop().create_task(
                self._retry_loop(), name=f"mqtt reconnect {self.meter.name}"
            )

    async def _retry_loop(self) -> None:
        """simpleMQTT's _connectMqtt task: try now, then every second, silently, until a
        reboot drops it.  That is checked after each attempt too: a cancel that lands while
        ``wait_for`` finishes a name lookup can be lost (Python 3.11's ``wait_for``)."""
        me = asyncio.current_task()
        while not await self._connect_once():
            if self._retry is not me:
                return
            await asyncio.sleep(RETRY_S)

    def _write(self, data: bytes) -> None:
        if self._link is not None:
            self._link.write(data)
            self._last_out = time.monotonic()

    # ------------------------------------------------------------------ per loop pass

    async def update(self) -> None:
        """MQTT::update(): lost-connection check, keep-alive, one incoming packet."""
        if not self._connected:
            return
        if not self._client_connected():
            self._disconnect(notify=True)
            self._start_retry()
            return
        link = self._link
        assert link is not None
        now = time.monotonic()
        if now - self._last_in > KEEPALIVE_S or now - self._last_out > KEEPALIVE_S:
            if self._ping_outstanding:  # the broker is gone without a FIN: time out
                link.close(graceful=False)
                return
            self._write(PINGREQ)
            self._last_in = now
            self._ping_outstanding = True
        if not link.packets:
            return
        packet = link.packets.popleft()
        self._last_in = now
        if link.packets:
            self.meter._wake.set()  # one packet per pass; come back at once for the next
        if packet.kind == PINGRESP:
            self._ping_outstanding = False
        elif packet.kind == PINGREQ_TYPE:
            self._write(b"\xd0\x00")
        elif packet.kind == PUBLISH and packet.size <= MAX_PACKET_BYTES:
            topic, payload = packet.publish()
            await self._on_message(topic, payload)

    def publish(self, topic: str, text: str) -> bool:
        """PubSubClient::publish, QoS 0, not retained; False when it refuses (§8.3)."""
        payload = text.encode("utf-8", "replace")
        if not self._client_connected() or not topic or not publish_fits(topic, payload):
            self.refused += 1
            return False
        self._write(publish_packet(topic, payload))
        self.published += 1
        return True

    def on_idle(self) -> None:
        """onIdle: the status every 5 s while connected (§8.2)."""
        if not self.connected():
            return
        now = time.monotonic()
        if now - self._last_status > self.meter.config.mqtt_status_s:
            self._last_status = now
            self.publish(self.topic_sample, arduino_json(self.status()))

    def sampling_changed(self, sampling: bool) -> None:
        """sampleCB: ``on``/``off`` on ``…/state/sample`` (§8.2)."""
        if self.connected():
            self.publish(self.topic_sample, "on" if sampling else "off")

    # ------------------------------------------------------------------ firmware handlers

    def status(self) -> dict[str, Any]:
        """sendStatus (§8.2, §12 #10): sums of L1-3 (current also N), energy read into the
        running total (not persisted here), 2-decimal rounding, short unix timestamp."""
        meter = self.meter
        snap = meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit)
        added = meter.ade_energy(reset=True)
        stored = meter.stored
        stored.energy_wh = [float(e + a) for e, a in zip(stored.energy_wh, added, strict=True)]
        power = _sum32(snap.active_power)
        energy = float(np.float32(sum(stored.energy_wh)))  # a double sum kept in a float
        # readCurrentRMS writes 4 values (L1-3 and N) into a 3-float array (§12 #10).
        current = float(np.float32(_sum32(snap.current_rms) + np.float32(snap.neutral_current_rms)))
        volt = float(np.float32(_sum32(snap.voltage_rms) / 3.0))
        return {
            "power": _round2(power, of_float=True),
            "energy": _round2(energy / 1000.0, of_float=False),
            "current": _round2(current / 1000.0, of_float=False),
            "volt": _round2(volt, of_float=True),
            "ts": str(int(meter.meter_unix())),
        }

    async def _on_message(self, topic: str, payload: bytes) -> None:
        """mqttCallback (§8.2): log, then dispatch on the topic's last level only."""
        meter = self.meter
        text = payload[:COMMAND_MAX_SIZE - 1].decode("utf-8", "replace")
        meter.log(LogLevel.INFO, MSG_ON_TOPIC.format(topic=topic, payload=text))
        leaf = topic.rsplit("/", 1)[-1]
        if leaf == LEAF_CMD:
            reply = await self._command(text)
            if reply:
                self._reply(arduino_json(reply))
        elif leaf == LEAF_STATE:
            state = "idle" if meter.session is None else "sampling"
            self._reply(arduino_json({"sampleState": state, "ts": meter.long_time()}))
        elif leaf == LEAF_SAMPLE:
            meter.log(LogLevel.INFO, WANTS_SAMPLE)
            self._reply(arduino_json(self._reading(text)))

    def _reply(self, text: str) -> None:
        self.meter.log(LogLevel.INFO, text)
        self.publish(self.topic_info, text)

    async def _command(self, text: str) -> dict[str, Any] | None:
        """parseCommand + handleJSON on the last connection that sent a command (§8.3)."""
        from ._commands import run_json

        meter = self.meter
        try:
            parsed: JsonInput | MalformedInput = JsonInput(json.loads(text))
        except ValueError:
            parsed = MalformedInput(text.rstrip("\r"))
        if isinstance(parsed, MalformedInput):
            meter.log(LogLevel.ERROR, parsed.log_text)
            return {"error": True, "msg": texts.JSON_FORMAT_ERROR}
        return await run_json(meter, self._getter(), parsed, text.encode())

    def _getter(self) -> Endpoint:
        """``newGetter``: the last TCP/serial connection that sent a command (initially
        serial); replies the handlers write themselves (info, getLog) go there."""
        meter = self.meter
        getter = getattr(meter, "last_getter", None) or meter.serial
        return getter if getter is not None else _NOWHERE

    def _reading(self, request: str) -> dict[str, Any]:
        """The ``sample`` topic (§8.2, §12 #12): three values ``%.2f``, unit, long time."""
        meter = self.meter
        snap = meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit)
        values = [np.float32(-1.0), np.float32(0.0), np.float32(0.0)]
        if request == "v":
            values, unit = [np.float32(v) for v in list(snap.voltage_rms)[:3]], "V"
        elif request == "i":
            values, unit = [np.float32(v) for v in list(snap.current_rms)[:3]], "mA"
        elif request == "q":
            values, unit = [np.float32(v) for v in list(snap.reactive_power)[:3]], "var"
        elif request == "s":
            values, unit = [np.float32(v) for v in list(snap.apparent_power)[:3]], "VA"
        elif request == "e":
            # Read-with-reset and not added to the total (§12 #11); L1 starts at -1 (§12 #12).
            fresh = meter.ade_energy(reset=True)
            for i in range(3):
                total = float(fresh[i]) + meter.stored.energy_wh[i]
                values[i] = np.float32(float(values[i]) + float(np.float32(total)) / 1000.0)
            unit = "kWh"
        else:
            values, unit = [np.float32(v) for v in list(snap.active_power)[:3]], "W"
        return {
            "value": ",".join(f"{float(v):.2f}" for v in values),
            "unit": unit,
            "ts": meter.long_time(),
        }

    # ------------------------------------------------------------------ MQTT sampling

    def publish_samples(self, session: Session) -> int:
        """writeDataMQTT (§4.14): every whole sample in the ring buffer, one message each,
        logged at INFO and published; counted as sent whether or not the publish went out.
        Returns the payload bytes taken from the ring buffer."""
        meter = self.meter
        bps = session.bps
        n = meter.ring.readable // bps
        if n == 0:
            return 0
        data = meter.ring.read(n * bps)
        samples = np.frombuffer(data, dtype="<f4").reshape(n, session.channels)
        unit = session.settings.measures.spec.unit_string
        for row in samples:
            text = arduino_json(
                {"unit": unit, "ts": meter.timestamp(), "values": [float(v) for v in row]}
            )
            meter.log(LogLevel.INFO, text)
            self.publish(self.topic_info, text)
        session.sent_payload_bytes += n * bps
        return n * bps


class _Nowhere:
    """A getter that takes nothing (a meter built without a serial port)."""

    log_level = None
    alive = False
    kind = "none"

    def write(self, data: bytes) -> int:
        return 0


_NOWHERE: Any = _Nowhere()
