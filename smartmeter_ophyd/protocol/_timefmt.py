"""The firmware's time formats (protocol.md §6.1), as pure functions of a unix time.

| name            | format                      | zone  |
|-----------------|-----------------------------|-------|
| long time       | ``MM/DD/YYYY HH:MM:SS.mmm`` | local |
| short time      | ``MM/DD HH:MM:SS``          | local |
| timestamp       | ``<unix s>.<mmm>``          | UTC   |
| short timestamp | ``<unix s>``                | UTC   |

Local time is UTC+1 h, plus 1 h of EU daylight saving time from the Sunday on/after
25 March 01:00 UTC to the Sunday on/after 25 October 01:00 UTC.  DST only applies once
the meter has synchronised with NTP (``dst_known``).  No clock is read here: callers
pass the instant.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta
from typing import Final

LOCATION_TIME_OFFSET_S: Final = 3600
DST_OFFSET_S: Final = 3600

_LONG_RE: Final = re.compile(r"^(\d\d)/(\d\d)/(\d{4}) (\d\d):(\d\d):(\d\d)\.(\d{3})$")
_TIMESTAMP_RE: Final = re.compile(r"^(\d+)\.(\d{1,3})$")


def _sunday_on_or_after(year: int, month: int, day: int) -> int:
    """Unix seconds of 01:00 UTC on the first Sunday on/after the given date."""
    d = datetime(year, month, day, 1, 0, 0, tzinfo=UTC)
    d += timedelta(days=(6 - d.weekday()) % 7)
    return calendar.timegm(d.timetuple())


def is_dst(unix_s: float) -> bool:
    """EU rule as implemented by the time library (§6.1)."""
    year = datetime.fromtimestamp(int(unix_s), UTC).year
    return _sunday_on_or_after(year, 3, 25) <= unix_s < _sunday_on_or_after(year, 10, 25)


def local_offset_s(unix_s: float, dst_known: bool = True) -> int:
    """Offset of the meter's local time from UTC, in seconds."""
    return LOCATION_TIME_OFFSET_S + (DST_OFFSET_S if dst_known and is_dst(unix_s) else 0)


def _split_ms(unix_s: float) -> tuple[int, int]:
    total_ms = int(round(unix_s * 1000))
    return total_ms // 1000, total_ms % 1000


def _local(unix_s: float, dst_known: bool) -> tuple[datetime, int]:
    seconds, ms = _split_ms(unix_s)
    local = datetime.fromtimestamp(seconds + local_offset_s(seconds, dst_known), UTC)
    return local, ms


def format_long_time(unix_s: float, dst_known: bool = True) -> str:
    """``MM/DD/YYYY HH:MM:SS.mmm`` in meter local time."""
    local, ms = _local(unix_s, dst_known)
    return local.strftime("%m/%d/%Y %H:%M:%S") + f".{ms:03d}"


def format_short_time(unix_s: float, dst_known: bool = True) -> str:
    """``MM/DD HH:MM:SS`` in meter local time (log lines)."""
    local, _ = _local(unix_s, dst_known)
    return local.strftime("%m/%d %H:%M:%S")


def format_timestamp(unix_s: float) -> str:
    """``<unix s>.<mmm>`` in UTC, e.g. ``1614697441.119``; ``0.000`` before any NTP sync."""
    seconds, ms = _split_ms(unix_s)
    return f"{seconds}.{ms:03d}"


def format_short_timestamp(unix_s: float) -> str:
    return str(int(unix_s))


def parse_timestamp(text: str) -> float:
    """Inverse of :func:`format_timestamp`; raises ValueError on anything else."""
    m = _TIMESTAMP_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not a firmware timestamp: {text!r}")
    seconds, frac = m.groups()
    return int(seconds) + int(frac.ljust(3, "0")) / 1000.0


def parse_long_time(text: str, dst_known: bool = True) -> float:
    """Inverse of :func:`format_long_time` (unix seconds, UTC)."""
    m = _LONG_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not a firmware long time: {text!r}")
    mo, d, y, hh, mm, ss, ms = (int(g) for g in m.groups())
    local_s = calendar.timegm((y, mo, d, hh, mm, ss, 0, 0, 0))
    guess = local_s - LOCATION_TIME_OFFSET_S
    return local_s - local_offset_s(guess, dst_known) + ms / 1000.0
