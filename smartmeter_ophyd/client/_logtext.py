"""Readings hidden in the meter's log texts (§4.7, §4.10, §6.2, §6.5), as small parsers.

Plans and devices subscribe to a client's log lines (:meth:`AsyncMeterClient.subscribe_logs`)
and use these to pick out what matters, e.g. the NTP confidence of a sync or a rate
correction during sampling.  Each function takes a :class:`LogLine` (or its text) and returns
None when the line is something else.  Texts are matched as firmware 2.2 prints them.

One NTP sync writes a *sync record* (§6.2, §6.5): ``NTP synced with conf: <ms>`` and, while
sampling, ``After NTP Sync: avg rate``, ``Should be: G, is T samples``, ``Offset of ...``,
``From <ts>``, ``To <ts>`` and, when the offset reaches 9 ms, ``Correcting: <n> samples``.
:class:`SyncRecordAssembler` (sans-I/O) joins those lines, fed in arrival order among any
others, into one frozen :class:`SyncRecord`.  Every value comes from the text, i.e. from the
meter's clock; host receive times are never used (read batching delays lines, §2.4 notes).

Limits:

* A failed sync logs nothing on firmware 2.2: ``_getTimeNTP`` gives up silently, and the only
  failure text is the ``ntp`` reply's ``msg`` ``Error syncing time`` (§3.7), which
  :class:`~smartmeter_ophyd.protocol.NtpReply` already reads.  A scheduled ``sample`` whose
  sync fails leaves no trace at all (§6.4).  The assembler therefore sees a failed sync as
  the absence of a record; it never invents one.
* The firmware prints the offset with 3 decimals and corrects at ``|offset| >= 0.009 s``;
  a printed ``0.009`` can be either side of that, so for it the assembler waits for the next
  line that proves whether a ``Correcting:`` line followed.
* Records need the sync lines at INFO: a connection at WARNING or above sees only some of
  them (§2.4).  Records with missing or stray lines are still returned, with ``problems``
  saying what is missing, so nothing is dropped silently.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from ..protocol import LogLine, parse_timestamp

_NUMBER: Final = r"[-+]?(?:\d+(?:\.\d*)?|inf|nan)"
_NTP_CONF: Final = re.compile(r"^NTP synced with conf: (-?\d+)\s*$")
_CORRECTING: Final = re.compile(r"^Correcting: (-?\d+) samples\s*$")
_OVERFLOW: Final = re.compile(r"^Overflow during ringBuffer write, lost (\d+) samples")
_RATE: Final = re.compile(r"^(\d+(?:\.\d+)?)Hz, (\d+)s\s*$")
_OFFSET: Final = re.compile(
    rf"^Offset of ({_NUMBER}) s, SecondInterrupts (-?\d+), SamplingDur ({_NUMBER})\s*$"
)
_MISSED: Final = re.compile(r"^MISSED (\d+) SAMPLES")
_AFTER_NTP: Final = re.compile(rf"^After NTP Sync: avg rate ({_NUMBER}) Hz\s*$")
_SHOULD_BE: Final = re.compile(r"^Should be: (-?\d+), is (-?\d+) samples\s*$")
# Strict: "To much clients, could not add client" (§12 item 5) also starts with "To ".
_FROM: Final = re.compile(r"^From (\d+\.\d{3})\s*$")
_TO: Final = re.compile(r"^To (\d+\.\d{3})\s*$")

CORRECT_SAMPLING_THRESHOLD_S: Final = 0.009
"""§6.5 ``CORRECT_SAMPLING_THRESHOLD``: a sync corrects the sample count from this offset on."""


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
    sampling (§6.5): the NTP-corrected sampling duration minus ``total / rate``."""

    offset_s: float
    second_interrupts: int
    sampling_duration_s: float


def ntp_offset(line: LogLine | str) -> NtpOffset | None:
    m = _match(_OFFSET, line)
    return NtpOffset(float(m.group(1)), int(m.group(2)), float(m.group(3))) if m else None


def ntp_average_rate(line: LogLine | str) -> float | None:
    """``After NTP Sync: avg rate <x> Hz``: samples taken per second of the NTP-corrected
    sampling duration (§6.5)."""
    m = _match(_AFTER_NTP, line)
    return float(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class SampleCounts:
    """``Should be: <goal>, is <total> samples`` (§6.5): what the NTP-corrected duration
    asks for, and what the meter has taken."""

    goal_samples: int
    total_samples: int


def ntp_sample_counts(line: LogLine | str) -> SampleCounts | None:
    m = _match(_SHOULD_BE, line)
    return SampleCounts(int(m.group(1)), int(m.group(2))) if m else None


def sync_from_timestamp(line: LogLine | str) -> float | None:
    """``From <timestamp>``: the session's start (unix s, meter clock, 1 ms; §6.5, §6.1)."""
    m = _match(_FROM, line)
    return parse_timestamp(m.group(1)) if m else None


def sync_to_timestamp(line: LogLine | str) -> float | None:
    """``To <timestamp>``: the meter's clock right after the sync (unix s, 1 ms; §6.5)."""
    m = _match(_TO, line)
    return parse_timestamp(m.group(1)) if m else None


# ------------------------------------------------------------------------- sync records


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One NTP sync as the meter logged it (§6.2, §6.5); all times are the meter's clock.

    The sampling fields are None for a sync while idle (only the confidence line is
    written).  ``correction`` is 0 when no ``Correcting:`` line belongs to the record.
    ``problems`` is empty for a record as the firmware writes it; otherwise it says which
    lines were missing or out of place.  ``lines`` are the log lines the record was built from.
    """

    confidence_ms: int | None
    avg_rate_hz: float | None = None
    goal_samples: int | None = None
    total_samples: int | None = None
    offset_s: float | None = None
    second_interrupts: int | None = None
    sampling_duration_s: float | None = None
    from_ts: float | None = None
    to_ts: float | None = None
    correction: int = 0
    problems: tuple[str, ...] = ()
    lines: tuple[LogLine, ...] = field(default=(), repr=False, compare=False)

    @property
    def during_sampling(self) -> bool:
        """Whether the meter was sampling (any §6.5 line belongs to the record)."""
        return any(
            v is not None
            for v in (self.avg_rate_hz, self.goal_samples, self.offset_s, self.from_ts, self.to_ts)
        ) or bool(self.correction)


class _Kind(enum.Enum):
    CONF = "NTP synced with conf"
    AVG_RATE = "After NTP Sync"
    COUNTS = "Should be"
    OFFSET = "Offset of"
    FROM = "From"
    TO = "To"
    CORRECTING = "Correcting"


_SAMPLING_KINDS: Final = (_Kind.AVG_RATE, _Kind.COUNTS, _Kind.OFFSET, _Kind.FROM, _Kind.TO)


def _classify(text: str) -> tuple[_Kind, object] | None:
    for kind, parse in _PARSERS:
        value = parse(text)
        if value is not None:
            return kind, value
    return None


_PARSERS: Final = (
    (_Kind.CONF, ntp_confidence_ms),
    (_Kind.AVG_RATE, ntp_average_rate),
    (_Kind.COUNTS, ntp_sample_counts),
    (_Kind.OFFSET, ntp_offset),
    (_Kind.FROM, sync_from_timestamp),
    (_Kind.TO, sync_to_timestamp),
    (_Kind.CORRECTING, sampling_correction),
)


class _Draft:
    """The lines of one record so far."""

    def __init__(self) -> None:
        self.values: dict[_Kind, object] = {}
        self.lines: list[LogLine] = []

    def has(self, kind: _Kind) -> bool:
        return kind in self.values

    @property
    def sampling(self) -> bool:
        return any(k in self.values for k in (*_SAMPLING_KINDS, _Kind.CORRECTING))

    def correction_due(self) -> bool | None:
        """Whether §6.5 demands a ``Correcting:`` line: None while the offset is unknown or
        printed as exactly the threshold (it was rounded to 3 decimals)."""
        offset = self.values.get(_Kind.OFFSET)
        if not isinstance(offset, NtpOffset):
            return None
        printed = round(abs(offset.offset_s), 3)
        if printed == CORRECT_SAMPLING_THRESHOLD_S:
            return None
        return printed > CORRECT_SAMPLING_THRESHOLD_S

    def finished(self) -> bool:
        """Over without waiting for another line: §6.5 writes ``Correcting:`` last, and
        ``To`` last when no correction is due."""
        if _Kind.CORRECTING in self.values:
            return True
        return _Kind.TO in self.values and self.correction_due() is False

    def build(self) -> SyncRecord:
        v = self.values
        problems: list[str] = []
        conf = v.get(_Kind.CONF)
        if conf is None:
            problems.append("no 'NTP synced with conf' line before the sync lines")
        if self.sampling:
            missing = [k.value for k in _SAMPLING_KINDS if k not in v]
            if missing:
                problems.append(f"missing lines: {', '.join(missing)}")
            if _Kind.CORRECTING not in v and self.correction_due():
                offset = v[_Kind.OFFSET]
                assert isinstance(offset, NtpOffset)
                problems.append(
                    f"offset {offset.offset_s:.3f} s reaches the 0.009 s threshold but no "
                    "'Correcting:' line arrived (§6.5)"
                )
            if v.get(_Kind.FROM) == 0.0:
                problems.append(
                    "From 0.000: the session started before the meter's first NTP sync (§6.1)"
                )
        avg = v.get(_Kind.AVG_RATE)
        counts = v.get(_Kind.COUNTS)
        offset = v.get(_Kind.OFFSET)
        from_ts = v.get(_Kind.FROM)
        to_ts = v.get(_Kind.TO)
        correction = v.get(_Kind.CORRECTING, 0)
        assert conf is None or isinstance(conf, int)
        assert avg is None or isinstance(avg, float)
        assert counts is None or isinstance(counts, SampleCounts)
        assert offset is None or isinstance(offset, NtpOffset)
        assert from_ts is None or isinstance(from_ts, float)
        assert to_ts is None or isinstance(to_ts, float)
        assert isinstance(correction, int)
        return SyncRecord(
            confidence_ms=conf,
            avg_rate_hz=avg,
            goal_samples=counts.goal_samples if counts else None,
            total_samples=counts.total_samples if counts else None,
            offset_s=offset.offset_s if offset else None,
            second_interrupts=offset.second_interrupts if offset else None,
            sampling_duration_s=offset.sampling_duration_s if offset else None,
            from_ts=from_ts,
            to_ts=to_ts,
            correction=correction,
            problems=tuple(problems),
            lines=tuple(self.lines),
        )


class SyncRecordAssembler:
    """Joins the log lines of NTP syncs into :class:`SyncRecord` values (sans-I/O).

    Feed it every :class:`LogLine` in arrival order (unrelated lines included);
    :meth:`feed` returns a record as soon as one sync's lines are complete.  A record is
    complete

    * while sampling, at its ``To`` line when the printed offset is below 9 ms, else at its
      ``Correcting:`` line (§6.5);
    * while idle (only the confidence line), when it is clear no §6.5 line follows: at the
      next lifeness line (sent only while idle, §2.6), the next sync, or :meth:`flush`.

    A record still open when a line proves it over (the next sync, a repeated kind of line,
    a lifeness line, or -- once ``To`` is in -- the per-second rate line, §4.7) is returned
    with ``problems`` naming what is missing.  Call :meth:`flush` when the lines end (the
    ``ntp`` reply arrived: the firmware logs the whole record before replying, §3.7; or
    the session ended) to get the record still open.
    """

    def __init__(self) -> None:
        self._draft: _Draft | None = None

    @property
    def pending(self) -> bool:
        """Whether lines of an unfinished record are held."""
        return self._draft is not None

    def feed(self, line: LogLine) -> SyncRecord | None:
        """Take one line; return the record it completes (or proves over), if any."""
        found = _classify(line.text)
        draft = self._draft
        if found is None:
            if draft is not None and self._ends_draft(line.text, draft):
                return self.flush()
            return None
        kind, value = found
        closed: SyncRecord | None = None
        if draft is not None and (kind is _Kind.CONF or draft.has(kind)):
            closed = self.flush()
            draft = None
        if draft is None:
            draft = self._draft = _Draft()
        draft.values[kind] = value
        draft.lines.append(line)
        if draft.finished():
            # A line that closed an open draft (a new conf line or a repeated kind) is alone
            # in the new one: a lone To never finishes (no offset), and Correcting never
            # repeats (its draft finished at the first).  So at most one record per line.
            assert closed is None
            return self.flush()
        return closed

    def flush(self) -> SyncRecord | None:
        """Return the open record (with ``problems`` if it is incomplete) and forget it."""
        draft, self._draft = self._draft, None
        return draft.build() if draft is not None else None

    @staticmethod
    def _ends_draft(text: str, draft: _Draft) -> bool:
        if not text:  # lifeness: the meter is idle (§2.6), no §6.5 line can follow
            return True
        return draft.has(_Kind.TO) and rate_report(text) is not None
