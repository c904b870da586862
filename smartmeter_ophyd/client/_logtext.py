"""Readings hidden in the meter's log texts (§4.7, §4.10, §6.2, §6.5), as small parsers.

Plans and devices subscribe to a client's log lines (:meth:`AsyncMeterClient.subscribe_logs`)
and use these to pick out what matters, e.g. the NTP confidence of a sync or a rate
correction during sampling.  Each function takes a :class:`LogLine` (or its text) and returns
None when the line is something else.  Texts are matched as firmware 2.2 prints them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..protocol import LogLine

_NTP_CONF: Final = re.compile(r"^NTP synced with conf: (-?\d+)\s*$")
_CORRECTING: Final = re.compile(r"^Correcting: (-?\d+) samples\s*$")
_OVERFLOW: Final = re.compile(r"^Overflow during ringBuffer write, lost (\d+) samples")
_RATE: Final = re.compile(r"^(\d+(?:\.\d+)?)Hz, (\d+)s\s*$")
_OFFSET: Final = re.compile(
    r"^Offset of (-?\d+(?:\.\d+)?) s, SecondInterrupts (\d+), SamplingDur (-?\d+(?:\.\d+)?)"
)
_MISSED: Final = re.compile(r"^MISSED (\d+) SAMPLES")


def _text(line: LogLine | str) -> str:
    return line.text if isinstance(line, LogLine) else line


def _match(pattern: re.Pattern[str], line: LogLine | str) -> re.Match[str] | None:
    return pattern.match(_text(line))


def ntp_confidence_ms(line: LogLine | str) -> int | None:
    """``NTP synced with conf: <ms>``: half the NTP round trip in ms (§6.2)."""
    m = _match(_NTP_CONF, line)
    return int(m.group(1)) if m else None


def sampling_correction(line: LogLine | str) -> int | None:
    """``Correcting: <n> samples``: samples duplicated (> 0) or dropped (< 0) (§6.5)."""
    m = _match(_CORRECTING, line)
    return int(m.group(1)) if m else None


def overflow_lost_samples(line: LogLine | str) -> int | None:
    """``Overflow during ringBuffer write, lost <n> samples``: the meter reboots (§4.10)."""
    m = _match(_OVERFLOW, line)
    return int(m.group(1)) if m else None


def missed_samples(line: LogLine | str) -> int | None:
    """``MISSED <n> SAMPLES`` (ERROR, once per second with an RTC, §4.7)."""
    m = _match(_MISSED, line)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class RateReport:
    """The per-second sampling log ``<rate>Hz, <total>s`` (§4.7)."""

    measured_rate: float
    total_samples: int


def rate_report(line: LogLine | str) -> RateReport | None:
    m = _match(_RATE, line)
    return RateReport(float(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, slots=True)
class NtpOffset:
    """``Offset of <s> s, SecondInterrupts <n>, SamplingDur <s>`` after an NTP sync while
    sampling (§6.5)."""

    offset_s: float
    second_interrupts: int
    sampling_duration_s: float


def ntp_offset(line: LogLine | str) -> NtpOffset | None:
    m = _match(_OFFSET, line)
    return NtpOffset(float(m.group(1)), int(m.group(2)), float(m.group(3))) if m else None
