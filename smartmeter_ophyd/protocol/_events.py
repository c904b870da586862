"""Events: what the stream decoder hands to its caller.

Every byte the meter sends ends up in exactly one event: a text line (reply, log, plain,
debug), decoded samples, or a report of bytes that could not be framed.  Nothing is
dropped silently: garbage becomes :class:`SkippedBytes`, a frame whose boundaries turned
out wrong becomes :class:`CorruptFrame` (its samples are *declared missing*, never
delivered), and a jump in packet numbers becomes :class:`PacketGap`.

Events are frozen dataclasses with slots; treat them as values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt


class LogLevel(enum.IntEnum):
    """Firmware log levels and their tags (§2.4).  A logger prints ``level >= its level``."""

    ALL = 0
    DEBUG = 1
    INFO = 2
    WARNING = 3
    ERROR = 4

    @property
    def tag(self) -> str:
        return _LEVEL_TAGS[self]

    @property
    def wire_name(self) -> str:
        """The string the ``log`` command takes (``all``, ``debug``, ...)."""
        return self.name.lower()

    @classmethod
    def from_tag(cls, tag: str) -> LogLevel:
        return _TAG_LEVELS[tag]


_LEVEL_TAGS: Final = {
    LogLevel.ALL: "A",
    LogLevel.DEBUG: "D",
    LogLevel.INFO: "I",
    LogLevel.WARNING: "W",
    LogLevel.ERROR: "E",
}
_TAG_LEVELS: Final = {tag: level for level, tag in _LEVEL_TAGS.items()}


class Event:
    """Base class of everything :class:`StreamDecoder` emits."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """An ``Info:{...}`` JSON line: a command reply or the info message.

    ``fields`` keeps the firmware's key order.  ``cmd`` is the echoed command name, which
    the firmware corrupts in some replies (§2.9) -- do not trust it blindly.  ``error`` is
    the raw flag, which is inverted for ``ntp`` and ``addWifi`` (§3.6, §3.7).
    """

    fields: dict[str, Any]
    raw: str

    @property
    def cmd(self) -> str | None:
        value = self.fields.get("cmd")
        return value if isinstance(value, str) else None

    @property
    def error(self) -> bool | None:
        value = self.fields.get("error")
        return value if isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class UnparsedReply(Event):
    """An ``Info:{`` line that is not valid JSON (e.g. ``getLog``'s first line, §3.14)."""

    raw: str


@dataclass(frozen=True, slots=True)
class RefusedLine(Event):
    """An ``Info:{`` line refused before ``json.loads``: nested deeper than any firmware
    reply can be (a hostile or broken peer, not SmartMeter firmware).  ``head`` is at most
    the first 64 characters, ``reason`` says what was refused."""

    head: str
    reason: str


@dataclass(frozen=True, slots=True)
class LogLine(Event):
    """``Info:[X]MM/DD HH:MM:SS: text`` (§2.4).  ``text`` is empty for lifeness lines (§2.6)."""

    level: LogLevel
    device_time: str
    """Short local time as printed by the meter (``MM/DD HH:MM:SS``)."""
    text: str


@dataclass(frozen=True, slots=True)
class PlainLine(Event):
    """Any other ``Info:`` line, e.g. ``Info:Setup done`` (§2.2)."""

    text: str


@dataclass(frozen=True, slots=True)
class DebugLine(Event):
    """An unprefixed text line (USB serial only: ``Sending...``, ``Took 3ms``, §4.12)."""

    text: str


@dataclass(frozen=True, slots=True, eq=False)
class Samples(Event):
    """Decoded samples from one or more consecutive, gap-free ``Data:`` frames.

    ``values`` has shape ``(n_samples, n_channels)``, dtype float32, in the meter's units.
    ``packets`` holds the packet number of each frame and ``frame_samples`` how many
    samples each frame carried (all equal in steady streams).  For unprefixed streams
    (port 54322, ``prefix: false``) ``packets`` is empty: there is no numbering.
    """

    values: npt.NDArray[np.float32]
    packets: npt.NDArray[np.uint32] = field(
        default_factory=lambda: np.empty(0, dtype=np.uint32)
    )
    frame_samples: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.empty(0, dtype=np.int64)
    )

    @property
    def n_samples(self) -> int:
        return int(self.values.shape[0])

    @property
    def first_packet(self) -> int | None:
        return int(self.packets[0]) if self.packets.size else None

    @property
    def last_packet(self) -> int | None:
        return int(self.packets[-1]) if self.packets.size else None


@dataclass(frozen=True, slots=True)
class PacketGap(Event):
    """Packet numbers jumped: ``expected`` was due, ``received`` arrived.

    ``missing_samples`` is ``missing_packets`` times the session's chunk size in samples
    when that is known (None otherwise): the samples are declared missing, never invented.
    """

    expected: int
    received: int
    missing_samples: int | None

    @property
    def missing_packets(self) -> int:
        return self.received - self.expected


@dataclass(frozen=True, slots=True)
class LatePacket(Event):
    """A frame numbered *below* the next expected packet (duplicate or reordered datagram).

    Its samples are carried here, not placed in the stream: they were already declared
    missing by an earlier :class:`PacketGap` (or duplicate data already delivered).
    """

    packet: int
    expected: int
    values: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class CorruptFrame(Event):
    """A frame header was read but the frame's extent proved wrong (the bytes after it are
    neither a prefix nor the serial CRLF).  Its samples are declared missing."""

    packet: int
    payload_length: int
    reason: str

    def missing_samples(self, bytes_per_sample: int) -> int:
        return self.payload_length // bytes_per_sample


@dataclass(frozen=True, slots=True)
class SkippedBytes(Event):
    """Bytes that were not part of any line or frame, skipped to resynchronise.

    ``head`` is at most the first 64 skipped bytes, for diagnostics.
    """

    count: int
    head: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class RepairedFrame(Event):
    """A log line written *inside* a data frame (§4.6, §12 #29) was cut out of it.

    Emitted just before the repaired frame's samples and the extracted :class:`LogLine`.
    """

    packet: int
    removed_bytes: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed the stream (``receive_data(b"")``).  ``pending`` bytes were buffered
    but never completed a line or frame; they are also reported as :class:`SkippedBytes`."""

    pending: int = 0


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Sentinel returned by ``next_event()`` when more bytes are needed."""
