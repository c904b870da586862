"""The meter client: the only place in the project that owns sockets to meters.

* :class:`AsyncMeterClient` -- asyncio; every firmware command as a typed method, request/
  reply matching, log subscription, keep-alive, reconnect, sampling sessions.
* :class:`MeterClient` -- the same client, blocking, on a private event-loop thread.
* :class:`SamplingSession` -- decoded :class:`Block` values with explicit :class:`Gap`
  records; :meth:`SamplingSession.stop` returns a reconciled :class:`SessionSummary`.
* :func:`open_raw_stream` -- the port-54322 raw stream (§7.1);
  :class:`StreamServer` -- accept meters that dial in (§7.2).
* :class:`AsyncMqttBroker` / :class:`MqttBroker` -- meters through an MQTT broker (§8): the
  5 s :class:`MeterStatus`, commands, broadcast, and low-rate MQTT sampling (§4.14).
* :func:`discover` / :func:`discover_async` -- meters announcing ``_elec._tcp`` (mDNS, §9).

Log texts that carry readings (NTP confidence, rate corrections, overflow) have parsers
(:func:`ntp_confidence_ms`, :func:`sampling_correction`, ...); :class:`SyncRecordAssembler`
joins the lines of one NTP sync into a :class:`SyncRecord` (§6.5).  Errors all derive from
:class:`MeterError` and name the meter.
"""

from typing import TYPE_CHECKING

from ._async import AsyncMeterClient
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
from ._logtext import (
    CORRECT_SAMPLING_THRESHOLD_S,
    NtpOffset,
    RateReport,
    SampleCounts,
    SyncRecord,
    SyncRecordAssembler,
    missed_samples,
    ntp_average_rate,
    ntp_confidence_ms,
    ntp_offset,
    ntp_sample_counts,
    overflow_lost_samples,
    rate_report,
    sampling_correction,
    sync_from_timestamp,
    sync_to_timestamp,
)
from ._model import ClientEvent, ConnectionLost, Reconnected, SampleConfig
from ._session import Block, BufferFill, Gap, SamplingSession
from ._streams import RawStream, StreamServer, open_raw_stream
from ._summary import SessionSummary
from ._sync import MeterClient, SyncSamplingSession

__all__ = [
    "CORRECT_SAMPLING_THRESHOLD_S",
    "AsyncMeterClient",
    "Block",
    "BufferFill",
    "ClientEvent",
    "ConnectionLost",
    "AsyncMqttBroker",
    "AsyncMqttMeter",
    "DiscoveredMeter",
    "MeterState",
    "MeterStatus",
    "MqttBroker",
    "MqttReading",
    "MqttSamplingSession",
    "Gap",
    "MeterBusyError",
    "MeterClient",
    "MeterCommandError",
    "MeterCommandRejected",
    "MeterConnectionError",
    "MeterError",
    "MeterIdentityError",
    "MeterProtocolError",
    "MeterTimeoutError",
    "NtpOffset",
    "RateReport",
    "RawStream",
    "Reconnected",
    "SampleConfig",
    "SampleCounts",
    "SamplingSession",
    "SessionSummary",
    "StreamServer",
    "SyncRecord",
    "SyncRecordAssembler",
    "SyncSamplingSession",
    "discover",
    "discover_async",
    "missed_samples",
    "ntp_average_rate",
    "ntp_confidence_ms",
    "ntp_offset",
    "ntp_sample_counts",
    "open_raw_stream",
    "overflow_lost_samples",
    "rate_report",
    "sampling_correction",
    "sync_from_timestamp",
    "sync_to_timestamp",
]

if TYPE_CHECKING:  # the real names for type checkers; at run time see __getattr__
    from ._discovery import DiscoveredMeter, discover, discover_async
    from ._mqtt import (
        AsyncMqttBroker,
        AsyncMqttMeter,
        MeterState,
        MeterStatus,
        MqttBroker,
        MqttReading,
        MqttSamplingSession,
    )

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("AsyncMqttBroker", "AsyncMqttMeter", "MeterState", "MeterStatus", "MqttBroker",
         "MqttReading", "MqttSamplingSession"),
        "._mqtt",
    ),
    **dict.fromkeys(("DiscoveredMeter", "discover", "discover_async"), "._discovery"),
}
"""MQTT and discovery are imported on first use: most sessions never need them."""


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value

