"""Incremental decoders for what the meter sends: the client's hot path.

Three decoders, all sans-I/O (bytes in, :mod:`._events` out, no clocks, no sockets):

* :class:`StreamDecoder` -- the command connection (TCP 54321) and USB serial: ``Info:``
  text lines interleaved with ``Data:`` frames (§2.3, §4.6, §4.12).  h11-style:
  ``receive_data(bytes)`` (``b""`` = EOF), ``next_event()`` / ``events()``.
* :class:`RawSampleDecoder` -- unprefixed sample streams (port 54322, ``prefix: false``, §7.1).
* :class:`DatagramDecoder` -- UDP, one frame per datagram (§4.13).

Packet numbering (§4.6: 0 for the first frame of a session, +1 per frame) is checked by one
:class:`PacketSequencer` shared by the frame decoders: a jump becomes :class:`PacketGap`
(emitted before the samples that follow it), a number below the expected one becomes
:class:`LatePacket` whose samples are *not* placed in the stream.

Robustness (§4.6, §12 #29, §13.6): a frame is only trusted when the bytes right after it
start with ``Data:``/``Info:`` (TCP) or are the serial CRLF (§4.12), or at EOF.  Otherwise a
log line written *inside* the frame is cut out (:class:`RepairedFrame`) when that makes the
frame line up, else the frame becomes :class:`CorruptFrame` (samples declared missing, never
delivered) and the decoder resynchronises on the next prefix.  Every byte that is neither a
line nor a frame is reported in one :class:`SkippedBytes` per run of garbage.

Performance: the caller's ``bytes`` are decoded in place when nothing is left over from
the previous read.  In a steady stream something always is -- the last frame waits for its
successor's prefix -- so that small tail (at most one frame or line, copied out when the
events were drained) is joined with the new chunk in one copy and the whole read decodes as
one bulk run: one :class:`Samples` event per read, not a second path for the held frame
(the per-read fixed cost dominated at 16-64 KiB reads).  A ``memoryview`` from a receive
buffer costs no extra copy this way (it is copied once anyway).  Only chunks fed without
draining, or smaller than the tail, use the other paths.  In steady streams runs of equal-size frames are validated in bulk
(one aligned copy of the headers, one compare of each frame's header words with the previous
frame's: prefix, length and consecutive packet numbers at once) and their payloads copied
out with one strided numpy copy into a single :class:`Samples` event; there is no per-frame
Python loop.  A run ends at a log line, a gap, or the end of a chunk; ``benchmarks/decode.py``
measures the throughput.

Limits: the buffer holds at most one line (``max_line_bytes``) or one frame plus an embedded
log line (``max_payload_bytes`` + ~1 KiB) after the caller drained the events; larger
declared lengths are treated as garbage.  Chunks fed without draining the events in between
are kept by reference (not copied) until the events are drained.  Packet numbers are
compared modulo 2**32.
Unprefixed sample data on the *command* connection (``prefix: false`` with ``type: TCP``)
cannot be framed and ends up as :class:`SkippedBytes`; use :class:`RawSampleDecoder` on a
socket that only carries raw samples.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ._errors import ProtocolError
from ._events import (
    NEED_DATA,
    ConnectionClosed,
    CorruptFrame,
    DebugLine,
    Event,
    LatePacket,
    LogLevel,
    LogLine,
    PacketGap,
    PlainLine,
    RefusedLine,
    RepairedFrame,
    Reply,
    Samples,
    SkippedBytes,
    UnparsedReply,
    _NeedData,
)
from ._wire import CRLF, DATA_PREFIX, FRAME_HEADER_SIZE, INFO_PREFIX

__all__ = [
    "DatagramDecoder",
    "PacketSequencer",
    "RawSampleDecoder",
    "StreamDecoder",
    "StreamSession",
    "classify_info_text",
    "json_depth",
]

logger = logging.getLogger(__name__)

_FLOAT_BYTES: Final = 4
_PACKET_MODULUS: Final = 1 << 32
_SKIP_HEAD_BYTES: Final = 64
_EMBEDDED_LINE_MAX: Final = 1024
"""Longest log line looked for inside a frame: log text is limited to ~500 chars (§2.4)."""
_SEQUENCED_WINDOW: Final = 1 << 16
"""A corrupt frame whose number is this close ahead of the expected one still advances
the sequence (its header is believed); farther numbers are taken for garbage."""
_LOG_LINE_RE: Final = re.compile(r"\[([ADIWE])\](\d\d/\d\d \d\d:\d\d:\d\d): ?(.*)\Z", re.DOTALL)
_PREFIX_BYTES: Final = (DATA_PREFIX, INFO_PREFIX)
MAX_JSON_DEPTH: Final = 32
"""Deepest JSON accepted in an ``Info:`` line; firmware replies nest at most 2 levels."""
_JSON_STRING_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS_RE: Final = re.compile(r"[\[\]{}]")
_BYTE_RAMP: Final = bytes(range(256)) * 2
"""Low bytes of consecutive packet numbers, from any start (see ``_scan_run``)."""
_WINDOW_MIN: Final = 64
"""Fewest bytes moved from a new chunk to complete a frame or line split across chunks."""


def _empty_f32(channels: int) -> npt.NDArray[np.float32]:
    return np.empty((0, channels), dtype=np.float32)


def _is_partial_prefix(tail: bytes) -> bool:
    return DATA_PREFIX.startswith(tail) or INFO_PREFIX.startswith(tail)


def json_depth(text: str) -> int:
    """How deeply the brackets of ``text`` nest, outside JSON strings (no parsing)."""
    depth = deepest = 0
    for token in _JSON_BRACKETS_RE.findall(_JSON_STRING_RE.sub('""', text)):
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def classify_info_text(text: str) -> Event:
    """Classify the text of an ``Info:`` line (prefix and CRLF removed), §2.3/§2.4.

    JSON nested deeper than :data:`MAX_JSON_DEPTH` is refused before ``json.loads`` (which
    would recurse into a ``RecursionError``): it becomes :class:`RefusedLine`.  Line length
    is bounded by the decoder (``max_line_bytes``).
    """
    if text.startswith("{"):
        # cheap first: two C-level counts; the exact scan only for suspicious lines
        if text.count("{") + text.count("[") > MAX_JSON_DEPTH:
            depth = json_depth(text)
            if depth > MAX_JSON_DEPTH:
                return RefusedLine(
                    text[:64], f"JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH})"
                )
        try:
            fields = json.loads(text)
        except ValueError:
            return UnparsedReply(text)
        if isinstance(fields, dict):
            return Reply(fields, text)
        return UnparsedReply(text)
    match = _LOG_LINE_RE.match(text)
    if match is not None:
        return LogLine(LogLevel.from_tag(match.group(1)), match.group(2), match.group(3))
    return PlainLine(text)


@dataclass(frozen=True, slots=True)
class StreamSession:
    """The frame format of the current sampling session (from the ``sample`` reply, §4.4)."""

    values_per_sample: int
    chunk_bytes: int | None = None
    prefix: bool = True

    @property
    def bytes_per_sample(self) -> int:
        return self.values_per_sample * _FLOAT_BYTES

    @property
    def chunk_samples(self) -> int | None:
        if self.chunk_bytes is None or self.chunk_bytes <= 0:
            return None
        return self.chunk_bytes // self.bytes_per_sample or None


class PacketSequencer:
    """Packet-number bookkeeping shared by the frame decoders (§4.6, §4.13).

    Numbers must run 0, 1, 2, ... per session.  Comparison is modulo 2**32: a number up to
    2**31 ahead is a gap, anything else is late (duplicate or reordered).
    """

    __slots__ = ("chunk_samples", "expected")

    def __init__(self, chunk_samples: int | None = None) -> None:
        self.expected = 0
        self.chunk_samples = chunk_samples

    def reset(self, chunk_samples: int | None) -> None:
        self.expected = 0
        self.chunk_samples = chunk_samples

    def delta(self, packet: int) -> int:
        """``packet - expected``: 0 = next, > 0 = that many packets missing, < 0 = late."""
        diff = (packet - self.expected) % _PACKET_MODULUS
        return diff - _PACKET_MODULUS if diff >= _PACKET_MODULUS // 2 else diff

    def admit(self, first_packet: int, n_frames: int) -> PacketGap | None:
        """Accept ``n_frames`` consecutive frames from ``first_packet`` (not late).

        Returns the gap to report *before* their samples, if the numbers jumped.
        """
        missing = self.delta(first_packet)
        gap = None
        if missing > 0:
            missing_samples = missing * self.chunk_samples if self.chunk_samples else None
            gap = PacketGap(self.expected, first_packet, missing_samples)
            logger.debug("packet gap: expected %d, received %d", self.expected, first_packet)
        self.expected = (first_packet + n_frames) % _PACKET_MODULUS
        return gap


@dataclass(frozen=True, slots=True)
class _Follow:
    ok: bool
    need_data: bool
    consumed: int = 0


_U64_MASK: Final = (1 << 64) - 1
_HEADER_WORD_OFFSETS: Final = (0, 3)
"""A frame header (11 bytes) seen as two overlapping little-endian 64-bit words: bytes 0..7
(``Data:`` + length + packet byte 0) and bytes 3..10 (``a:`` + length + packet)."""
_CRLF_U16: Final = int.from_bytes(CRLF, "little")

_FOLLOW_NEED: Final = _Follow(False, True)
_FOLLOW_BAD: Final = _Follow(False, False)
_FOLLOW_OK: Final = _Follow(True, False)
_FOLLOW_OK_CRLF: Final = _Follow(True, False, len(CRLF))


class StreamDecoder:
    """Decode the command connection (TCP) or USB serial stream into events.

    Usage (h11 style)::

        decoder.receive_data(chunk)      # b"" when the peer closed
        for event in decoder.events():   # or next_event() until NEED_DATA
            ...

    A frame is held back until the bytes after it prove its extent (see module docstring).
    When the stream goes quiet right after a frame (e.g. a ``reqSamples`` reply, §5.2) call
    :meth:`release_pending` to get it without waiting.

    ``serial=True`` selects the USB rules (§4.12): every frame is followed by CRLF, and
    unprefixed text lines are :class:`DebugLine`.
    """

    def __init__(
        self,
        *,
        serial: bool = False,
        default_values_per_sample: int = 6,
        max_line_bytes: int = 65536,
        max_payload_bytes: int = 48000,
    ) -> None:
        if default_values_per_sample <= 0:
            raise ValueError("default_values_per_sample must be positive")
        if max_line_bytes < 16 or not 0 < max_payload_bytes <= 0xFFFF:
            raise ValueError("max_line_bytes must be >= 16 and max_payload_bytes in 1..65535")
        self.serial = serial
        self.default_values_per_sample = default_values_per_sample
        self.max_line_bytes = max_line_bytes
        self.max_payload_bytes = max_payload_bytes
        # The bytes being decoded are ``_buf[_pos:]`` followed by the chunks in ``_pending``.
        # ``_buf`` is usually the caller's own ``bytes`` object (decoded in place, no copy);
        # it is a private bytearray only for a small unconsumed tail, or for a "window": the
        # tail plus the first ``_moved`` bytes of ``_pending[0]``, just enough to complete the
        # frame or line that straddles the two chunks.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._pending: deque[bytes] = deque()
        self._moved = 0
        self._want = 0
        self._out: deque[Event] = deque()
        self._eof = False
        self._closed_emitted = False
        self._release = False
        self._session: StreamSession | None = None
        self._vps = default_values_per_sample
        self._sequencer = PacketSequencer()
        self._skip_count = 0
        self._skip_head = bytearray()
        self._skip_reason = ""
        self._skipped_after_eof = 0
        self._header_ramp: npt.NDArray[np.uint64] = np.empty((0, 2), dtype=np.uint64)
        self._packet_ramp: npt.NDArray[np.uint32] = np.empty(0, dtype=np.uint32)
        self._frame_samples: dict[int, npt.NDArray[np.int64]] = {}

    # ------------------------------------------------------------------ public state

    @property
    def session(self) -> StreamSession | None:
        """The current sampling session, or None outside one."""
        return self._session

    @property
    def sequencer(self) -> PacketSequencer:
        return self._sequencer

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buf) - self._pos + sum(map(len, self._pending)) - self._moved

    @property
    def max_buffered_bytes(self) -> int:
        """Upper bound of :attr:`buffered_bytes` once the events have been drained."""
        frame = FRAME_HEADER_SIZE + self.max_payload_bytes + _EMBEDDED_LINE_MAX + len(CRLF)
        return max(self.max_line_bytes, frame) + 16

    def start_session(
        self, values_per_sample: int, chunk_bytes: int | None = None, prefix: bool = True
    ) -> None:
        """Begin a session explicitly (e.g. a stream-server connection that never sees the
        ``sample`` reply).  Packet numbers restart at 0."""
        if values_per_sample <= 0:
            raise ValueError(f"values_per_sample must be positive, got {values_per_sample}")
        self._session = StreamSession(values_per_sample, chunk_bytes, prefix)
        self._vps = values_per_sample
        self._sequencer.reset(self._session.chunk_samples)

    def end_session(self) -> None:
        self._session = None
        self._vps = self.default_values_per_sample
        self._sequencer.reset(None)

    # ------------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes; ``b""`` signals EOF (the peer closed).

        ``bytes`` are decoded in place and must not be changed afterwards (they cannot be);
        any other buffer (``bytearray``, ``memoryview``) is copied first.  When a small
        unconsumed tail (the frame held back for its successor's prefix, a split line) is
        waiting, it and ``data`` are joined in that one copy, so the whole read decodes as
        one bulk run.  Samples never share memory with ``data``, and no reference to it is
        kept once the events have been drained.
        """
        if self._eof:
            if data:
                raise ProtocolError("receive_data() called after EOF")
            return
        if not data:
            if self._pending:  # EOF before the events were drained: decide on all bytes
                self._merge_pending()
            self._want = 0
            self._eof = True
            return
        buf = self._buf
        rest = len(buf) - self._pos
        if not self._pending:
            if rest <= 0:
                # decoded in place: no copy of the hot path's bytes; a mutable buffer could
                # change under us, so it is copied
                self._buf = data if type(data) is bytes else bytes(data)
                self._pos = 0
                self._want = 0
                return
            if rest <= self.max_buffered_bytes:
                if len(data) < rest:
                    # a chunk smaller than the tail (byte-wise feeding): append, amortised O(1)
                    if not isinstance(buf, bytearray):
                        buf = self._buf = bytearray(memoryview(buf)[self._pos :])
                        self._pos = 0
                    elif self._pos:
                        del buf[: self._pos]
                        self._pos = 0
                    buf += data
                else:
                    # one copy of tail + chunk; at most doubles the bytes copied per read
                    self._buf = b"".join((memoryview(buf)[self._pos :], data))
                    self._pos = 0
                self._want = 0
                return
        if type(data) is not bytes:
            data = bytes(data)
        self._pending.append(data)
        if self._want and len(self._pending) == 1 and isinstance(buf, bytearray):
            # complete the frame the tail is waiting for (and the bytes proving it) now
            if self._pos:
                del buf[: self._pos]
                self._pos = 0
            self._extend_window(buf, self._want)
        self._want = 0

    def _merge_pending(self) -> None:
        merged = bytearray(memoryview(self._buf)[self._pos :])
        first = True
        for chunk in self._pending:
            merged += memoryview(chunk)[self._moved if first else 0 :]
            first = False
        self._pending.clear()
        self._buf = merged
        self._pos = 0
        self._moved = 0

    def _advance(self) -> bool:
        """One step, or more bytes moved in from ``_pending``; False when stuck."""
        if self._step():
            if self._moved and self._pos >= len(self._buf) - self._moved:
                self._leave_window()
            return True
        return self._refill()

    def _leave_window(self) -> None:
        """The read position passed into ``_pending[0]``: decode it in place from there."""
        chunk = self._pending.popleft()
        self._pos -= len(self._buf) - self._moved
        self._buf = chunk
        self._moved = 0

    def _refill(self) -> bool:
        """The current bytes cannot make progress: bring in more, or keep only the tail."""
        want, self._want = self._want, 0
        buf = self._buf
        rest = len(buf) - self._pos
        if not self._pending:
            # Keep only the unconsumed tail (bounded by max_buffered_bytes), never a view
            # of -- or a reference to -- the caller's whole chunk.
            if self._pos or not isinstance(buf, bytearray):
                self._buf = bytearray(memoryview(buf)[self._pos :]) if rest else b""
                self._pos = 0
            self._want = want if rest else 0  # receive_data() moves that much at once
            return False
        if rest <= 0:
            if self._moved:
                self._leave_window()
            else:
                self._buf = self._pending.popleft()
                self._pos = 0
            return True
        if not isinstance(buf, bytearray):  # the caller's chunk: copy only its tail
            buf = self._buf = bytearray(memoryview(buf)[self._pos :])
        elif self._pos:
            del buf[: self._pos]
        self._pos = 0
        # Move what the stuck step asked for, else grow geometrically (lines, repairs).
        self._extend_window(buf, max(want, rest, _WINDOW_MIN))
        return True

    def _extend_window(self, window: bytearray, n: int) -> None:
        """Append the next ``n`` bytes of ``_pending[0]`` to the window ``_buf``."""
        chunk = self._pending[0]
        start = self._moved
        window += memoryview(chunk)[start : start + n]
        self._moved = min(len(chunk), start + n)
        if self._moved == len(chunk):  # the whole chunk is in the window now
            self._pending.popleft()
            self._moved = 0

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA` when more bytes are required."""
        while not self._out:
            if not self._advance():
                return NEED_DATA
        return self._out.popleft()

    def events(self) -> list[Event]:
        """Every event available now (possibly none)."""
        while self._advance():
            pass
        out = list(self._out)
        self._out.clear()
        return out

    def release_pending(self) -> list[Event]:
        """Emit a complete last frame that is still waiting for the bytes after it.

        Trade-off: such a frame is delivered *unverified*.  If it later turns out that a log
        line was written inside it, or that its length field was wrong, the damage can no
        longer be repaired: the wrong samples stay delivered and the bytes that follow are
        reported as :class:`SkippedBytes`.  Call it only when the stream has gone quiet
        (no bytes for a while), which is when a hidden corruption is least likely.
        """
        self._release = True
        try:
            return self.events()
        finally:
            self._release = False

    # ------------------------------------------------------------------ state machine

    def _emit(self, event: Event) -> None:
        if self._skip_count:
            self._flush_skip()
        self._out.append(event)

    def _flush_skip(self) -> None:
        self._out.append(SkippedBytes(self._skip_count, bytes(self._skip_head), self._skip_reason))
        logger.debug("skipped %d bytes: %s", self._skip_count, self._skip_reason)
        self._skip_count = 0
        self._skip_head = bytearray()
        self._skip_reason = ""

    def _skip(self, n: int, reason: str) -> None:
        """Skip ``n`` bytes at the read position, extending the current run of garbage."""
        if n <= 0:
            return
        if not self._skip_count:
            self._skip_reason = reason
        room = _SKIP_HEAD_BYTES - len(self._skip_head)
        if room > 0:
            self._skip_head += self._buf[self._pos : self._pos + min(n, room)]
        self._skip_count += n
        if self._eof:
            self._skipped_after_eof += n
        self._pos += n

    def _step(self) -> bool:
        """Make one unit of progress; False when nothing can be done without more data."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail <= 0:
            if self._eof and not self._closed_emitted:
                if self._skip_count:
                    self._flush_skip()
                self._closed_emitted = True
                self._out.append(ConnectionClosed(self._skipped_after_eof))
                return True
            return False
        if buf.startswith(DATA_PREFIX, pos):
            return self._step_frame()
        if buf.startswith(INFO_PREFIX, pos):
            return self._step_info_line()
        if self.serial:
            return self._step_debug_line()
        if avail < len(DATA_PREFIX) and _is_partial_prefix(bytes(buf[pos:])) and not self._eof:
            return False
        return self._step_garbage("bytes outside any line or frame")

    def _find_prefix(self, start: int, end: int) -> int:
        buf = self._buf
        info = buf.find(INFO_PREFIX, start, end)
        data = buf.find(DATA_PREFIX, start, end if info < 0 else info + len(INFO_PREFIX) - 1)
        if data < 0:
            return info
        return data if info < 0 else min(data, info)

    def _step_garbage(self, reason: str) -> bool:
        """Skip to the next ``Data:``/``Info:`` (keeping a possible partial prefix)."""
        buf = self._buf
        found = self._find_prefix(self._pos + 1, len(buf))
        if found >= 0:
            self._skip(found - self._pos, reason)
            return True
        keep = 0 if self._eof else len(DATA_PREFIX) - 1
        target = max(self._pos + 1, len(buf) - keep)
        if target > len(buf):
            return False
        self._skip(target - self._pos, reason)
        return True

    # ------------------------------------------------------------------------- lines

    def _step_info_line(self) -> bool:
        buf = self._buf
        pos = self._pos
        newline = buf.find(b"\n", pos, pos + self.max_line_bytes)
        if newline < 0:
            if len(buf) - pos >= self.max_line_bytes:
                self._skip(len(INFO_PREFIX), f"line longer than {self.max_line_bytes} bytes")
                return self._step_garbage(f"line longer than {self.max_line_bytes} bytes")
            if self._eof:
                return self._step_garbage("incomplete line at end of stream")
            return False
        text = bytes(buf[pos + len(INFO_PREFIX) : newline]).decode("utf-8", "replace").rstrip("\r")
        self._pos = newline + 1
        self._emit_line(classify_info_text(text))
        return True

    def _emit_line(self, event: Event) -> None:
        self._emit(event)
        if isinstance(event, Reply):
            self._track_session(event)

    def _track_session(self, reply: Reply) -> None:
        fields = reply.fields
        if reply.cmd == "sample" and reply.error is False and "measurements" in fields:
            measurements = fields.get("measurements")
            chunk = fields.get("chunksize")
            prefix = fields.get("prefix", True)
            if (
                isinstance(measurements, int)
                and not isinstance(measurements, bool)
                and measurements > 0
            ):
                self.start_session(
                    measurements,
                    chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else None,
                    prefix if isinstance(prefix, bool) else True,
                )
            else:
                logger.warning("sample reply with unusable measurements %r", measurements)
        elif reply.cmd == "stop" and "samples" in fields:
            self.end_session()

    def _step_debug_line(self) -> bool:
        """Serial only (§4.12): unprefixed text up to ``\\n`` or up to the next prefix."""
        buf = self._buf
        pos = self._pos
        limit = min(len(buf), pos + self.max_line_bytes)
        newline = buf.find(b"\n", pos, limit)
        prefix_at = self._find_prefix(pos + 1, newline if newline >= 0 else limit)
        if prefix_at >= 0:
            end, resume = prefix_at, prefix_at
        elif newline >= 0:
            end, resume = newline + 1, newline + 1
        elif len(buf) - pos >= self.max_line_bytes:
            return self._step_garbage(f"line longer than {self.max_line_bytes} bytes")
        elif self._eof:
            if _is_partial_prefix(bytes(buf[pos:])):
                self._skip(len(buf) - pos, "incomplete prefix at end of stream")
                return True
            end, resume = len(buf), len(buf)
        else:
            return False
        raw = bytes(buf[pos:end]).rstrip(b"\r\n")
        if any(b < 0x20 and b not in (0x09, 0x0D) or b == 0x7F for b in raw):
            self._skip(resume - pos, "binary bytes outside any line or frame")
            return True
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._skip(resume - pos, "undecodable bytes outside any line or frame")
            return True
        self._pos = resume
        self._emit(DebugLine(text))
        return True

    # ------------------------------------------------------------------------ frames

    def _follow(self, end: int) -> _Follow:
        """What the bytes at ``end`` (just after a payload) say about the frame's extent."""
        buf = self._buf
        rest = len(buf) - end
        if rest < 0:
            return _FOLLOW_BAD if self._eof else _FOLLOW_NEED
        if self.serial:  # §4.12: every serial frame is followed by CRLF
            if rest >= 2:
                return _FOLLOW_OK_CRLF if buf.startswith(CRLF, end) else _FOLLOW_BAD
            if rest == 1 and buf[end] != CRLF[0]:
                return _FOLLOW_BAD
            return _FOLLOW_OK if self._eof else _FOLLOW_NEED
        if rest >= len(DATA_PREFIX):
            if buf.startswith(DATA_PREFIX, end) or buf.startswith(INFO_PREFIX, end):
                return _FOLLOW_OK
            return _FOLLOW_BAD
        if not _is_partial_prefix(bytes(buf[end:])):
            return _FOLLOW_BAD
        return _FOLLOW_OK if self._eof else _FOLLOW_NEED

    def _step_frame(self) -> bool:
        buf = self._buf
        pos = self._pos
        end = len(buf)
        avail = end - pos
        if avail < 7:
            return (
                self._step_garbage("incomplete frame header at end of stream")
                if self._eof
                else False
            )
        length = buf[pos + 5] | (buf[pos + 6] << 8)
        bytes_per_sample = _FLOAT_BYTES * self._vps
        if length == 0 or length > self.max_payload_bytes or length % bytes_per_sample:
            self._skip(1, f"implausible frame length {length}")
            return True
        if avail < FRAME_HEADER_SIZE:
            return (
                self._step_garbage("incomplete frame header at end of stream")
                if self._eof
                else False
            )
        packet = int.from_bytes(buf[pos + 7 : pos + 11], "little")
        payload_end = pos + FRAME_HEADER_SIZE + length
        # bytes that prove a frame's extent: the serial CRLF, else the next prefix
        proof = len(CRLF) if self.serial else len(DATA_PREFIX)
        if end < payload_end:
            if self._eof:
                return self._truncated_frame(packet, length)
            self._want = payload_end + proof - end
            return False
        stride = FRAME_HEADER_SIZE + length + (len(CRLF) if self.serial else 0)
        n_avail = avail // stride
        run = 1
        if n_avail >= 2 and self._sequencer.delta(packet) >= 0:
            if self.serial or not self._scan_run(pos, packet, length, stride, n_avail):
                run = self._bulk_run(pos, packet, length, stride, n_avail)
            else:
                run = n_avail
        last_end = pos + (run - 1) * stride + FRAME_HEADER_SIZE + length
        follow = self._follow(last_end)
        if follow.ok:
            self._emit_frames(pos, packet, run, length, stride)
            self._pos = last_end + follow.consumed
            return True
        if run > 1:  # the frames before the last one are proven by their successor
            self._emit_frames(pos, packet, run - 1, length, stride)
            self._pos = pos + (run - 1) * stride
            return True
        if follow.need_data:
            if self._release and not self._pending:
                self._emit_frames(pos, packet, 1, length, stride)
                self._pos = payload_end
                return True
            self._want = payload_end + proof - end
            return False
        return self._repair_or_corrupt(packet, length)

    def _scan_run(self, pos: int, packet: int, length: int, stride: int, n_avail: int) -> bool:
        """The steady-state fast path: True if all ``n_avail`` frames from ``pos`` have frame
        0's prefix and length and consecutive packet numbers (False: let :meth:`_bulk_run`
        find the first bad one).

        Each header byte is compared across the run with one strided slice of the bytes
        (``buf[pos + k : end : stride]``, C code): no numpy here, since each numpy call costs
        ~10 us when a wake-up finds the caches cold, which is most of a batched read's cost
        (``benchmarks/ingest.py --profile``).  Frame 0 is valid: the caller read it.
        """
        if n_avail > 256:
            return False
        buf = self._buf
        end = pos + n_avail * stride
        for k in range(7):  # "Data:" and the length
            column = buf[pos + k : end : stride]
            if column.count(column[:1]) != n_avail:
                return False
        # packet numbers: the low byte counts up; the others change at most once (a carry)
        low = packet & 0xFF
        if buf[pos + 7 : end : stride] != _BYTE_RAMP[low : low + n_avail]:
            return False
        same = min(n_avail, 256 - low)
        after = (packet + same) % _PACKET_MODULUS
        for k in (1, 2, 3):
            shift = 8 * k
            expected = bytes(((packet >> shift) & 0xFF,)) * same
            if same < n_avail:
                expected += bytes(((after >> shift) & 0xFF,)) * (n_avail - same)
            if buf[pos + 7 + k : end : stride] != expected:
                return False
        return True

    def _bulk_run(self, pos: int, packet: int, length: int, stride: int, n_avail: int) -> int:
        """How many frames from ``pos`` (at most ``n_avail``) have valid headers of the same
        length and consecutive packet numbers -- vectorised, a handful of numpy calls.

        Frame ``i``'s two header words (see :data:`_HEADER_WORD_OFFSETS`) minus ``i`` times
        one packet step must equal frame 0's: that checks prefix, length and numbering at
        once (the 2**32 wrap of the firmware's counter carries out of the 64-bit word).
        Frame 0 itself is valid: the caller read its prefix, length and packet number.
        """
        buf = self._buf
        # one strided copy makes the header words aligned and our own (no buffer view lives on)
        headers: npt.NDArray[np.uint64] = np.ndarray(
            (n_avail, 2), "<u8", buf, pos, (stride, _HEADER_WORD_OFFSETS[1])
        ).copy()
        headers -= self._header_steps(n_avail)
        # Now a frame is valid iff its row equals frame 0's, i.e. the row before it.  In the
        # flat view element j and j + 2 are the same word of consecutive frames.
        flat = headers.reshape(-1)
        differs = flat[2:] != flat[:-2]
        crlf_bad: npt.NDArray[np.bool_] | None = None
        if self.serial:  # §4.12: and every frame ends with CRLF
            crlf_bad = (
                np.ndarray((n_avail,), "<u2", buf, pos + FRAME_HEADER_SIZE + length, (stride,))
                != _CRLF_U16
            )
        if not np.count_nonzero(differs) and (crlf_bad is None or not crlf_bad.any()):
            return n_avail
        first_bad = n_avail
        rows_differ = differs[0::2] | differs[1::2]  # index k: frame k + 1 vs frame k
        if rows_differ.any():
            first_bad = int(rows_differ.argmax()) + 1
        if crlf_bad is not None and crlf_bad.any():
            first_bad = min(first_bad, int(crlf_bad.argmax()))
        return max(1, first_bad)

    def _header_steps(self, n: int) -> npt.NDArray[np.uint64]:
        """Row ``i``: how frame ``i``'s header words exceed frame 0's (cached, grown)."""
        if self._header_ramp.shape[0] < n:
            steps = np.arange(max(n, 2 * self._header_ramp.shape[0]), dtype=np.uint64)
            self._header_ramp = np.stack([steps << np.uint64(56), steps << np.uint64(32)], 1)
            self._packet_ramp = steps.astype(np.uint32)
        return self._header_ramp[:n]

    def _emit_frames(self, pos: int, first_packet: int, run: int, length: int, stride: int) -> None:
        """Deliver ``run`` consecutive frames from ``pos``; the one payload copy is here."""
        floats = length // _FLOAT_BYTES
        payloads: npt.NDArray[np.float32] = np.ndarray(
            (run, floats), "<f4", self._buf, pos + FRAME_HEADER_SIZE, (stride, _FLOAT_BYTES)
        )
        values = payloads.astype(np.float32, order="C")  # always a copy, never a view
        del payloads
        if first_packet + run <= _PACKET_MODULUS:  # proven consecutive by the caller
            packets = np.arange(first_packet, first_packet + run, dtype=np.uint32)
        else:  # across the 2**32 wrap (uint32 wraps like the firmware)
            self._header_steps(run)  # grows the ramp if needed
            packets = self._packet_ramp[:run] + first_packet
        self._deliver(first_packet, packets, values.reshape(-1, self._vps), floats // self._vps)

    def _deliver(
        self,
        first_packet: int,
        packets: npt.NDArray[np.uint32],
        values: npt.NDArray[np.float32],
        per_frame: int,
    ) -> None:
        sequencer = self._sequencer
        n_frames = packets.shape[0]
        if first_packet == sequencer.expected:  # the steady case: no gap, not late
            sequencer.expected = (first_packet + n_frames) % _PACKET_MODULUS
        elif sequencer.delta(first_packet) < 0:
            # Only single frames reach here late (bulk runs start at a non-late packet).
            self._emit(LatePacket(first_packet, sequencer.expected, values))
            return
        else:
            gap = sequencer.admit(first_packet, n_frames)
            if gap is not None:
                self._emit(gap)
        counts = self._frame_samples.get(per_frame)
        if counts is None or counts.shape[0] < packets.shape[0]:
            counts = np.full(max(packets.shape[0], 256), per_frame, dtype=np.int64)
            if len(self._frame_samples) > 16:
                self._frame_samples.clear()
            self._frame_samples[per_frame] = counts
        self._emit(Samples(values, packets, counts[: packets.shape[0]].copy()))

    def _repair_or_corrupt(self, packet: int, length: int) -> bool:
        """The bytes after the frame are wrong: cut out an embedded log line (§4.6, §12 #29)
        or give the frame up."""
        buf = self._buf
        pos = self._pos
        payload_start = pos + FRAME_HEADER_SIZE
        payload_end = payload_start + length
        candidate = buf.find(b"Info:[", payload_start, payload_end)
        while candidate >= 0:
            line_end = buf.find(CRLF, candidate, candidate + _EMBEDDED_LINE_MAX)
            if line_end < 0:
                if len(buf) < candidate + _EMBEDDED_LINE_MAX and not self._eof:
                    return False
            else:
                removed = line_end + len(CRLF) - candidate
                follow = self._follow(payload_end + removed)
                if follow.need_data:
                    return False
                if follow.ok:
                    self._repair(packet, length, candidate, removed, follow.consumed)
                    return True
            candidate = buf.find(b"Info:[", candidate + 1, payload_end)
        reason = "bytes after the frame are not " + ("CRLF" if self.serial else "a prefix")
        self._corrupt(packet, length, reason)
        self._skip(1, "resynchronising after a corrupt frame")
        return True

    def _repair(self, packet: int, length: int, line_at: int, removed: int, tail: int) -> None:
        buf = self._buf
        pos = self._pos
        payload_start = pos + FRAME_HEADER_SIZE
        frame_end = payload_start + length + removed
        payload = bytes(buf[payload_start:line_at]) + bytes(buf[line_at + removed : frame_end])
        text = bytes(buf[line_at + len(INFO_PREFIX) : line_at + removed - len(CRLF)])
        logger.info("log line inside frame %d cut out (%d bytes)", packet, removed)
        self._emit(RepairedFrame(packet, removed))
        values = np.frombuffer(payload, dtype="<f4").reshape(-1, self._vps).astype(np.float32)
        self._deliver(
            packet,
            np.array([packet], dtype=np.uint32),
            values,
            length // (_FLOAT_BYTES * self._vps),
        )
        self._emit_line(classify_info_text(text.decode("utf-8", "replace")))
        self._pos = frame_end + tail

    def _corrupt(self, packet: int, length: int, reason: str) -> None:
        ahead = self._sequencer.delta(packet)
        if 0 <= ahead < _SEQUENCED_WINDOW:
            gap = self._sequencer.admit(packet, 1)
            if gap is not None:
                self._emit(gap)
        logger.warning("corrupt frame %d (%d bytes): %s", packet, length, reason)
        self._emit(CorruptFrame(packet, length, reason))

    def _truncated_frame(self, packet: int, length: int) -> bool:
        self._corrupt(packet, length, "stream ended inside the frame")
        self._skip(len(self._buf) - self._pos, "incomplete frame at end of stream")
        return True


class RawSampleDecoder:
    """Unprefixed float32 samples (port 54322 stream, ``prefix: false``, §7.1).

    Emits :class:`Samples` (without packet numbers) of whole samples; a partial sample is
    kept for the next call.  At EOF a leftover partial sample is reported as
    :class:`SkippedBytes`, then :class:`ConnectionClosed`.
    """

    def __init__(self, values_per_sample: int = 6) -> None:
        if values_per_sample <= 0:
            raise ValueError(f"values_per_sample must be positive, got {values_per_sample}")
        self.values_per_sample = values_per_sample
        self._bytes_per_sample = values_per_sample * _FLOAT_BYTES
        self._rest = b""
        self._out: deque[Event] = deque()
        self._eof = False

    @property
    def buffered_bytes(self) -> int:
        return len(self._rest)

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise ProtocolError("receive_data() called after EOF")
            return
        if not data:
            self._eof = True
            pending = len(self._rest)
            if pending:
                self._out.append(
                    SkippedBytes(
                        pending, self._rest[:_SKIP_HEAD_BYTES], "partial sample at end of stream"
                    )
                )
            self._rest = b""
            self._out.append(ConnectionClosed(pending))
            return
        if self._rest:
            data = self._rest + data
        whole = len(data) - len(data) % self._bytes_per_sample
        self._rest = bytes(data[whole:])
        if whole:
            values = np.frombuffer(data, dtype="<f4", count=whole // _FLOAT_BYTES).copy()
            self._out.append(
                Samples(values.reshape(-1, self.values_per_sample).astype(np.float32, copy=False))
            )

    def next_event(self) -> Event | _NeedData:
        return self._out.popleft() if self._out else NEED_DATA

    def events(self) -> list[Event]:
        out = list(self._out)
        self._out.clear()
        return out


class DatagramDecoder:
    """UDP sample datagrams: one frame per datagram (§4.13), same gap/late rules as TCP."""

    def __init__(
        self, values_per_sample: int, chunk_bytes: int | None = None, prefix: bool = True
    ) -> None:
        self.session = StreamSession(values_per_sample, chunk_bytes, prefix)
        self.sequencer = PacketSequencer(self.session.chunk_samples)

    def receive_datagram(self, data: bytes) -> list[Event]:
        session = self.session
        bytes_per_sample = session.bytes_per_sample
        if not session.prefix:
            if not data or len(data) % bytes_per_sample:
                return [self._invalid(data, "datagram is not a whole number of samples")]
            values = np.frombuffer(data, dtype="<f4").copy()
            return [
                Samples(
                    values.reshape(-1, session.values_per_sample).astype(np.float32, copy=False)
                )
            ]
        if len(data) < FRAME_HEADER_SIZE or not data.startswith(DATA_PREFIX):
            return [self._invalid(data, "datagram does not start with a Data: header")]
        length = int.from_bytes(data[5:7], "little")
        if length != len(data) - FRAME_HEADER_SIZE:
            return [
                self._invalid(
                    data,
                    f"declared length {length} != {len(data) - FRAME_HEADER_SIZE} payload bytes",
                )
            ]
        if length == 0 or length % bytes_per_sample:
            return [
                self._invalid(data, f"payload of {length} bytes is not a whole number of samples")
            ]
        packet = int.from_bytes(data[7:11], "little")
        values = (
            np.frombuffer(data, dtype="<f4", offset=FRAME_HEADER_SIZE)
            .copy()
            .reshape(-1, session.values_per_sample)
            .astype(np.float32, copy=False)
        )
        if self.sequencer.delta(packet) < 0:
            return [LatePacket(packet, self.sequencer.expected, values)]
        events: list[Event] = []
        gap = self.sequencer.admit(packet, 1)
        if gap is not None:
            events.append(gap)
        events.append(
            Samples(
                values,
                np.array([packet], dtype=np.uint32),
                np.array([values.shape[0]], dtype=np.int64),
            )
        )
        return events

    @staticmethod
    def _invalid(data: bytes, reason: str) -> SkippedBytes:
        logger.debug("invalid datagram (%d bytes): %s", len(data), reason)
        return SkippedBytes(len(data), bytes(data[:_SKIP_HEAD_BYTES]), reason)
