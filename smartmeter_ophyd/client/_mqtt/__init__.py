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

The parts, one job each: ``_messages`` (topics, limits, message values), ``_link`` (the
broker connection and reconnect), ``_status`` (idle statuses), ``_session`` (the MQTT
sampling session), ``_meter`` (one meter's commands and sampling), ``_broker`` (routing by
name and broadcast), ``_blocking`` (the blocking facade).
"""

from ._blocking import MqttBroker
from ._broker import AsyncMqttBroker
from ._messages import (
    BROADCAST_TOPIC,
    MAX_MQTT_RATE_HZ,
    MeterState,
    MeterStatus,
    MqttReading,
    expected_sample_reply,
    info_topic,
    meter_topic,
    parse_status,
    status_topic,
)
from ._meter import AsyncMqttMeter
from ._session import MqttSamplingSession

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
