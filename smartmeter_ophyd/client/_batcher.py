"""Read batching: wake the event loop once per batch of a full-rate stream, not per segment.

At 8 kHz x 6 channels a meter sends ~195 kB/s in TCP segments of a few kB, and waking the
loop per segment costs far more CPU than decoding the bytes.  While a TCP session streams at
full rate, :class:`ReadBatcher` raises the socket's receive low-water mark (``SO_RCVLOWAT``;
Linux epoll honours it for TCP) above ``batch_s`` seconds of data (at most 256 KiB), and the
loop reads it about once per ``batch_s``, all batched meters in the same wake-up (below).
Streams slower than 16 KiB per ``batch_s`` are never batched (below ~2.7 kHz for 24-byte
samples at the default 0.25 s), and neither are paused, slotted or not-yet-started ones.

The trade-off is latency: samples and log lines reach the session up to ``batch_s`` later.
A stream that stalls or slows down is unbatched 1.5 to 2.5 ``batch_s`` after its last
read (the mark stays 1 until the stream is back at full rate; a frame held for proof is
released ``RELEASE_QUIET_S`` later, §5.2).  Replies stay prompt: the mark drops before
every command is sent, and is raised again only when no reply is awaited, no stop is under
way and the last ``batch_s`` brought at least half a batch.  EOF and errors are never
delayed (the kernel reports them regardless of the mark).

Timers and wake-ups: none per read and none per meter.  Each batcher is a duty of the event
loop's one :class:`~._timer.LoopTimer`.  While a stream is batched its mark stays at twice a
batch (:data:`GATE_FACTOR`), so the kernel does not wake the loop for it; instead, every
``batch_s`` on a grid shared by all batched meters, the timer's one callback reads every
batched meter (:meth:`~._transports.Link.read_now`, one ``recv_into`` each) and decodes it
there.  One loop wake-up then serves all meters: the fixed cost of waking (Python and numpy
code and data out of the CPU caches, ~0.2-0.4 ms on a loaded host) is paid once per
``batch_s``, not once per meter, and no readiness callback, ``epoll`` round or mark change
is spent per batch.  A timer that is late does not hold data back beyond two batches (the
kernel then wakes the loop for that meter alone), and EOF and errors still wake it at once.

Limits: Linux only (elsewhere ``set_receive_low_water`` refuses and nothing is batched);
serial and UDP sessions are never batched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Final, Protocol

from ._timer import LoopTimer
from ._transports import Link

logger = logging.getLogger(__name__)

DEFAULT_BATCH_S: Final = 0.25
"""Default read batching while streaming: wake about this often per meter (adds this latency)."""
BATCH_MIN_BYTES: Final = 16 * 1024
BATCH_MAX_BYTES: Final = 256 * 1024
"""Bounds of the receive low-water mark while batching (the read buffer is 256 KiB)."""
BATCH_STALL_FACTOR: Final = 1.5
"""Drop the low-water mark when no read came for this many ``batch_s`` (stall, slow-down)."""
GATE_FACTOR: Final = 2
"""While batched, the mark is this many batches: the shared tick reads, not the kernel's wake-up."""
RELEASE_QUIET_S: Final = 0.2
"""A held last frame is released after the stream was quiet this long (reqSamples, §5.2)."""


class BatchHost(Protocol):
    """What a batcher reads from its client, only when its timer fires."""

    @property
    def bytes_received(self) -> int: ...

    @property
    def last_rx(self) -> float: ...

    def batch_allowed(self) -> bool:
        """The session streams at full rate, no stop is under way, no reply is awaited."""

    def held_bytes(self) -> int:
        """Bytes the decoder holds (a frame waiting for the bytes that prove it)."""

    def release_held(self) -> None:
        """Deliver the held frame unverified (the stream went quiet)."""


class ReadBatcher:
    """The receive low-water mark of one connection while its session streams."""

    def __init__(self, host: BatchHost, batch_s: float, label: Callable[[], str]) -> None:
        if batch_s < 0:
            raise ValueError(f"batch_s must be >= 0, got {batch_s!r}")
        self._host = host
        self.batch_s = batch_s
        self.label = label
        self.raises = 0
        """How often batching was switched on (for tests and diagnostics)."""
        self.tick_reads = 0
        """How often the shared tick read this meter directly (for the benchmarks)."""
        self._link: Link | None = None
        self._batch = 0
        self._mark = 1
        self._batched = False
        self._timer: LoopTimer | None = None
        self._window_start = 0.0
        self._window_bytes = 0
        self._dropped_at = 0.0

    @property
    def low_water(self) -> int:
        """The receive low-water mark now (1: the loop wakes on every arrival)."""
        link = self._link
        return link.receive_low_water if link is not None else 1

    def watch(self, link: Link, nbytes_per_s: float, batchable: bool) -> None:
        """A session streams on ``link`` at ``nbytes_per_s``; batch it if ``batchable``."""
        wanted = int(nbytes_per_s * self.batch_s) if batchable else 0
        self._batch = 0 if wanted < BATCH_MIN_BYTES else min(BATCH_MAX_BYTES, wanted)
        self._mark = min(BATCH_MAX_BYTES, GATE_FACTOR * self._batch)
        self._link = link
        now = time.monotonic()
        self._new_window(now)
        self._timer = LoopTimer.of(asyncio.get_running_loop())
        self._timer.add(self, now + min(RELEASE_QUIET_S, self.batch_s or RELEASE_QUIET_S))

    def unwatch(self) -> None:
        """The session ended or the link dropped: back to a wake-up per arrival."""
        self.drop()
        if self._timer is not None:
            self._timer.remove(self)
        self._timer = None
        self._link = None

    def drop(self) -> None:
        """Stop batching now (a reply is due, or the stream stalled): mark 1, read at once."""
        if not self._batched:
            return
        self._batched = False
        link = self._link
        if link is not None:
            link.set_receive_low_water(1)
        now = time.monotonic()
        self._dropped_at = now
        self._new_window(now)
        if self._timer is not None:
            self._timer.wake_by(self, now + min(RELEASE_QUIET_S, self.batch_s or RELEASE_QUIET_S))

    def _new_window(self, now: float) -> None:
        self._window_start = now
        self._window_bytes = self._host.bytes_received

    def _next_tick(self, now: float) -> float:
        """The first multiple of ``batch_s`` after ``now``: batched meters with the same
        ``batch_s`` are due at the same instants, and the loop's one timer fires once for
        all of them instead of once per meter."""
        return (math.floor(now / self.batch_s) + 1) * self.batch_s

    def tick(self, now: float) -> float:
        """Do what is due at ``now``; return when this batcher is next due."""
        link = self._link
        if link is None or link.is_closing:
            return math.inf
        host = self._host
        if self._batched:
            if now - host.last_rx < BATCH_STALL_FACTOR * self.batch_s:
                # read it here, in the same callback as every other batched meter
                self.tick_reads += 1
                if link.read_now() is not None:
                    if self._link is None:  # the read ended the session
                        return math.inf
                    if self._batched and host.batch_allowed():
                        return self._next_tick(now)
            self.drop()  # a stall or slow-down, or a reply is awaited: read at once
        quiet_since = max(host.last_rx, self._dropped_at)
        due = math.inf
        if host.held_bytes():
            if now - quiet_since >= RELEASE_QUIET_S:
                host.release_held()
            else:
                due = quiet_since + RELEASE_QUIET_S
        if self._batch:
            window_end = self._window_start + self.batch_s
            if now < window_end:
                return min(due, window_end)
            received = host.bytes_received - self._window_bytes
            if (
                received >= self._batch // 2  # not paused or slowed down (scheduled start, §5)
                and host.batch_allowed()
                and link.set_receive_low_water(self._mark)
            ):
                self._batched = True
                self.raises += 1
                return self._next_tick(now)
            self._new_window(now)
            due = min(due, now + self.batch_s)
        elif due == math.inf:
            due = now + RELEASE_QUIET_S  # unbatched: a held frame may appear (reqSamples)
        return due
