"""Values the client hands out: connection events, the sample configuration, and the
helpers that describe a meter's change or hide its secrets in logs.

Limits: plain values only; nothing here touches a socket or the event loop.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Final

from ..protocol import DeviceInfo, Measures, Sample, Transport


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


_SECRET_PATTERNS: Final = (
    (re.compile(r'("pwd"\s*:\s*")[^"]*(")'), r"\1***\2"),
    (re.compile(r"(PW: )[^,\"]*"), r"\1***"),
)


def redact(text: str) -> str:
    """Hide WiFi passwords (``pwd`` keys, ``PW:`` in addWifi's msg, §3.6) before logging."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def info_changes(previous: DeviceInfo | None, current: DeviceInfo) -> dict[str, tuple[Any, Any]]:
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
