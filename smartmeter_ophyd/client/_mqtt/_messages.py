"""MQTT topics, packet limits and the meters' MQTT messages as values (protocol.md §8.2, §8.3).

Pure parsing and formatting, no I/O: what a status, a ``state`` reply and a ``sample``-topic
reading mean, which commands MQTT cannot carry, and PubSubClient's 256-byte packet check.
Malformed messages raise :class:`MeterProtocolError` naming the meter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from ...protocol import Sample, Transport, arduino_json, chunk_size
from .._errors import MeterProtocolError

TOPIC_BASE: Final = "powermeter"
BROADCAST_TOPIC: Final = f"{TOPIC_BASE}/cmd"
MAX_PACKET_BYTES: Final = 256
"""PubSubClient's packet buffer: longer packets are neither sent nor received (§8.3)."""
MAX_MQTT_RATE_HZ: Final = 50
"""Highest rate this module samples over MQTT: one publish per sample (§4.14)."""
READINGS: Final = {"p": "W", "v": "V", "i": "mA", "q": "var", "s": "VA", "e": "kWh"}
"""``…/sample`` requests and the unit of their reply (§8.2)."""
NOT_OVER_MQTT: Final = {
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


def mqtt_label(name: str, host: str, port: int) -> str:
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


def parse_reading(meter: str, label: str, quantity: str, fields: dict[str, Any],
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

