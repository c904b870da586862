"""Sampling sessions: decoded blocks, declared gaps, and the reconciliation at stop.

A :class:`SamplingSession` is what ``await client.sample(...)`` returns.  The client's
receive loop (TCP, serial) or a UDP endpoint feeds it codec events; the caller iterates
:class:`Block` values.  Nothing is zero-filled, dropped or invented: a jump in packet
numbers, a corrupt frame or a late datagram becomes a :class:`Gap` attached to the block
that follows it, and every sample is counted once in the :class:`SessionSummary`.

Limits: the buffer between the receive loop and the consumer is unbounded (a consumer that
stops reading grows memory, but the meter is never paused behind the caller's back); a
warning is logged every time the backlog passes another ``backlog_warn_samples``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from ..protocol import (
    RING_BUFFER_BYTES,
    CorruptFrame,
    Event,
    LatePacket,
    Measures,
    PacketGap,
    RepairedFrame,
    Samples,
    SkippedBytes,
    Transport,
    max_request_samples,
)
from ._errors import MeterCommandError, MeterConnectionError, MeterTimeoutError
from ._summary import SessionSummary, reconcile

if TYPE_CHECKING:
    from ..protocol import SampleReply, StopReply

logger = logging.getLogger(__name__)

SCHEDULED_STOP_MARGIN_S: Final = 0.3
SCHEDULED_WAIT_MAX_S: Final = 21.0
BUFFER_WARN_FRACTION: Final = 0.5
"""Warn when a paused meter's ring buffer is estimated above this fill (overflow reboots, §4.10)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Samples that should have arrived here and did not (or arrived unusable).

    ``kind`` is ``"packet-gap"`` (packet numbers jumped from ``expected_packet`` to
    ``received_packet``), ``"corrupt-frame"`` (a frame whose extent proved wrong; its samples
    are declared missing) or ``"late-packet"`` (a datagram older than the next expected one:
    reordered, so already declared missing by an earlier gap, or duplicated, so already
    received; its samples are in ``late_values``, not in the stream, and not counted).
    ``missing_samples`` is None when the codec could not size the gap.
    """

    kind: str
    expected_packet: int | None
    received_packet: int | None
    missing_samples: int | None
    detail: str = ""
    late_values: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)

    @property
    def missing_packets(self) -> tuple[int, int] | None:
        """The packet numbers ``[first, stop)`` this record declares missing, for gap tables.

        A corrupt frame declares its own packet; a late packet declares nothing (an earlier
        packet gap already declared its samples missing).
        """
        if self.kind == "late-packet" or self.expected_packet is None:
            return None
        if self.kind == "corrupt-frame" or self.received_packet is None:
            return self.expected_packet, self.expected_packet + 1
        return self.expected_packet, self.received_packet


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    """Consecutive decoded samples, ``values`` shaped ``(samples, channels)`` float32.

    ``packets``/``frame_samples`` give the frame each run of samples came from (empty for
    unnumbered streams).  ``gaps`` are the holes declared *immediately before* ``values``;
    a block may carry gaps and no samples (e.g. a gap at the very end of a stream).
    """

    values: npt.NDArray[np.float32]
    packets: npt.NDArray[np.uint32]
    frame_samples: npt.NDArray[np.int64]
    channels: tuple[str, ...]
    gaps: tuple[Gap, ...] = ()

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
class BufferFill:
    """Estimated bytes sitting in a paused meter's 3,670,016-byte ring buffer (§4.10)."""

    bytes: int
    fraction: float
    seconds_to_overflow: float
    """At the current rate, how long until the meter overflows and reboots (inf if draining)."""


class SamplingSession:
    """One sampling session of one meter.

    Iterate it (``async for block in session``) or call :meth:`next_block`; end it with
    :meth:`stop`, which returns the :class:`SessionSummary`.  If the connection drops the
    blocks already received are still delivered, then iteration raises
    :class:`MeterConnectionError`; :attr:`summary` then says ``ended_by="connection lost"``.
    """

    def __init__(
        self,
        *,
        meter: str,
        reply: SampleReply,
        transport: Transport,
        send_stop: Callable[[float | None], Awaitable[StopReply]] | None,
        send_cts: Callable[[bool], Awaitable[None]] | None,
        send_request: Callable[[int], Awaitable[None]] | None,
        drain: Callable[[], Awaitable[None]] | None = None,
        on_end: Callable[[SamplingSession], None] | None = None,
        backlog_warn_samples: int = 10_000_000,
    ) -> None:
        self.meter = meter
        self.reply = reply
        self.transport = transport
        self.measures: Measures = reply.measures
        self.rate: int = int(reply.sampling_rate)
        self.channels: tuple[str, ...] = self.measures.channels
        self._send_stop = send_stop
        self._send_cts = send_cts
        self._send_request = send_request
        self._drain = drain
        self._on_end = on_end
        self._blocks: collections.deque[Block] = collections.deque()
        self._pending_gaps: list[Gap] = []
        self._wakeup = asyncio.Event()
        self._end_error: BaseException | None = None
        self._ended = False
        self.stop_requested = False
        self.prompt_from: int | None = None
        """From this many received samples on, every arrival is read at once (no read
        batching): a consumer that stops at a sample count sees it when it arrives, not up
        to a batch later (the meter would sample on meanwhile)."""
        self._arrival_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._summary: SessionSummary | None = None
        self._stop_reply: StopReply | None = None
        self._backlog = 0
        self._backlog_warn = backlog_warn_samples
        self._backlog_warned_at = 0
        # counters
        self.received_samples = 0
        self.missing_declared = 0
        self.missing_unsized_gaps = 0
        self.late_samples = 0
        self.gap_count = 0
        self.corrupt_frames = 0
        self.repaired_frames = 0
        self.skipped_bytes = 0
        self.frames = 0
        # flow control (§5.1): flowCtr or slots start paused
        paused = bool(getattr(reply, "flow_control", False) or getattr(reply, "slot", None))
        self._paused_since: float | None = time.monotonic() if paused else None
        self._received_at_pause = 0
        self._warned_fill = False

    # ----------------------------------------------------------------- fed by the client

    def _feed(self, events: list[Event]) -> None:
        """Take the codec events that belong to this session (called by the receive loop)."""
        channels = self.channels
        pending = self._pending_gaps
        for event in events:
            if type(event) is Samples:
                block = Block(
                    values=event.values,
                    packets=event.packets,
                    frame_samples=event.frame_samples,
                    channels=channels,
                    gaps=tuple(pending) if pending else (),
                )
                if pending:
                    pending = self._pending_gaps = []
                n = event.values.shape[0]
                self.received_samples += n
                self.frames += event.packets.size
                self._backlog += n
                self._blocks.append(block)
            elif isinstance(event, PacketGap):
                self.gap_count += 1
                if event.missing_samples is None:
                    self.missing_unsized_gaps += 1
                else:
                    self.missing_declared += event.missing_samples
                pending.append(
                    Gap("packet-gap", event.expected, event.received, event.missing_samples)
                )
                logger.warning(
                    "%s: packet gap, expected %d got %d (%s samples missing)",
                    self.meter,
                    event.expected,
                    event.received,
                    event.missing_samples,
                )
            elif isinstance(event, CorruptFrame):
                self.corrupt_frames += 1
                missing = event.missing_samples(self.measures.bytes_per_sample)
                self.missing_declared += missing
                pending.append(
                    Gap("corrupt-frame", event.packet, event.packet, missing, event.reason)
                )
                logger.warning("%s: corrupt frame %d: %s", self.meter, event.packet, event.reason)
            elif isinstance(event, LatePacket):
                n = int(event.values.shape[0])
                self.late_samples += n
                pending.append(
                    Gap("late-packet", event.expected, event.packet, 0, late_values=event.values)
                )
                logger.warning(
                    "%s: late packet %d (expected %d), %d samples kept aside",
                    self.meter,
                    event.packet,
                    event.expected,
                    n,
                )
            elif isinstance(event, RepairedFrame):
                self.repaired_frames += 1
            elif isinstance(event, SkippedBytes):
                self.skipped_bytes += event.count
        if self._backlog - self._backlog_warned_at > self._backlog_warn:
            self._backlog_warned_at = self._backlog
            logger.warning(
                "%s: %d samples received but not yet consumed", self.meter, self._backlog
            )
        if self._blocks or pending:
            self._wakeup.set()
        if self._arrival_waiters:
            self._wake_arrival_waiters()

    def _arrived(self) -> int:
        """Samples received or declared missing so far."""
        return self.received_samples + self.missing_declared

    def _wake_arrival_waiters(self, everyone: bool = False) -> None:
        arrived = self._arrived()
        waiting = []
        for n, future in self._arrival_waiters:
            if everyone or n <= arrived:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((n, future))
        self._arrival_waiters = waiting

    def _finish(self, *, ended_by: str, stop: StopReply | None = None,
                error: BaseException | None = None) -> None:
        """Close the stream: flush pending gaps, compute the summary, wake the consumer."""
        if self._ended:
            return
        self._ended = True
        if self._pending_gaps:
            self._blocks.append(
                Block(
                    values=np.empty((0, len(self.channels)), dtype=np.float32),
                    packets=np.empty(0, dtype=np.uint32),
                    frame_samples=np.empty(0, dtype=np.int64),
                    channels=self.channels,
                    gaps=tuple(self._pending_gaps),
                )
            )
            self._pending_gaps = []
        self._stop_reply = stop
        self._end_error = error
        self._summary = reconcile(self, ended_by, stop)
        if error is not None:
            logger.warning("%s", error)
        self._wakeup.set()
        self._wake_arrival_waiters(everyone=True)
        if self._on_end is not None:
            self._on_end(self)

    # --------------------------------------------------------------------- consumer API

    @property
    def active(self) -> bool:
        return not self._ended

    @property
    def streaming(self) -> bool:
        """True while the meter is expected to send continuously (not paused, no slots)."""
        if self._ended or self._paused_since is not None or self.reply.slot is not None:
            return False
        return self.reply.scheduled is None or bool(self.frames)  # not still counting down

    @property
    def queued_blocks(self) -> int:
        """Blocks received and not yet taken by :meth:`next_block` or :meth:`drain_nowait`."""
        return len(self._blocks)

    @property
    def stop_reply(self) -> StopReply | None:
        """The meter's stop reply (§4.8), once :meth:`stop` got it."""
        return self._stop_reply

    @property
    def summary(self) -> SessionSummary | None:
        """The reconciliation, once the session has ended (None while it runs)."""
        return self._summary

    async def next_block(self, timeout: float | None = None) -> Block | None:
        """The next block; None once the session has ended cleanly and everything was read.

        Raises :class:`MeterConnectionError` (or the error that ended the session) after the
        last received block when the session ended abnormally, and
        :class:`~smartmeter_ophyd.client.MeterTimeoutError` on ``timeout``.
        """
        while True:
            if self._blocks:
                block = self._blocks.popleft()
                self._backlog -= block.n_samples
                return block
            if self._ended:
                if self._end_error is not None:
                    raise self._end_error
                return None
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
            else:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except TimeoutError:
                    raise MeterTimeoutError(
                        self.meter, f"no sample data within {timeout} s"
                    ) from None

    async def wait_for_samples(self, n: int) -> bool:
        """Wait until ``n`` samples have arrived or been declared missing (at once if they
        have), or until the session has ended; True if they have.

        Counted as the frames are decoded, before any consumer reads them: a consumer that
        stops the meter at a count learns that the count arrived even while it is still busy
        with the blocks before it.
        """
        if not self._ended and self._arrived() < n:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (n, future)
            self._arrival_waiters.append(entry)
            try:
                await future
            finally:
                if entry in self._arrival_waiters:  # cancelled while waiting
                    self._arrival_waiters.remove(entry)
        return self._arrived() >= n

    def __aiter__(self) -> AsyncIterator[Block]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Block]:
        while True:
            block = await self.next_block()
            if block is None:
                return
            yield block

    def drain_nowait(self) -> list[Block]:
        """Every block received so far, without waiting."""
        out = list(self._blocks)
        self._blocks.clear()
        self._backlog = 0
        return out

    async def stop(self, timeout: float | None = None) -> SessionSummary:
        """Send ``stop``, keep decoding frames until the stop reply, and reconcile (§4.8).

        ``timeout`` bounds the wait for the reply (default: the client's timeout); a meter
        that flushes a large backlog first (§4.7) may need longer.  Without a reply in time
        the session ends anyway (``summary.ended_by == "stop timed out"``, no device counts)
        and :class:`~smartmeter_ophyd.client.MeterTimeoutError` is raised.

        Blocks not consumed yet stay available to :meth:`next_block` / iteration.  A
        scheduled start cannot be cancelled (``stop`` during the countdown is refused and the
        meter starts anyway, §6.4, §12 #24): before its start time this waits for the start
        (at most ~20 s) and then stops, so the meter is not left sampling to nobody.
        """
        if not self._ended:
            self.stop_requested = True
            if self._send_stop is None:
                raise MeterCommandError(self.meter, "this stream cannot be stopped by command")
            await self._await_scheduled_start()
            try:
                reply = await self._send_stop(timeout)
            except MeterConnectionError as exc:
                self._finish(ended_by="connection lost", error=exc)
                raise
            except MeterTimeoutError as exc:
                # The meter's state is unknown; end the session here so its counts are final
                # (and recorded) rather than waiting for a reply that may never come.
                self._finish(ended_by="stop timed out", error=exc)
                raise
            if self._drain is not None:
                await self._drain()
            self._finish(ended_by="stop" if reply.succeeded else "stopped elsewhere", stop=reply)
        assert self._summary is not None
        return self._summary

    async def _await_scheduled_start(self) -> None:
        scheduled = getattr(self.reply, "scheduled", None)
        start_ts = self.reply.start_ts
        if scheduled is None or not start_ts or self.frames:
            return
        # start_ts is the meter's (NTP-synced) clock; the host clock is assumed close to it.
        wait = min(start_ts - time.time() + SCHEDULED_STOP_MARGIN_S, SCHEDULED_WAIT_MAX_S)
        if wait > 0:
            logger.warning(
                "%s: a scheduled start cannot be cancelled (§6.4); stopping %.1f s from now, "
                "just after it starts",
                self.meter,
                wait,
            )
            await asyncio.sleep(wait)

    # ---------------------------------------------------------------------- flow control

    async def cts(self, ready: bool) -> None:
        """Pause (False) or resume (True) sending (§5.1).  Paused data fills the ring buffer."""
        if self._send_cts is None:
            raise MeterCommandError(self.meter, "flow control is not available on this stream")
        await self._send_cts(ready)
        if ready:
            self._paused_since = None
        elif self._paused_since is None:
            self._paused_since = time.monotonic()
            self._received_at_pause = self.received_samples

    async def request_samples(self, n: int) -> None:
        """Ask for one frame of ``n`` samples (§5.2; 11..42 for 24-byte, 11..128 for 8-byte).

        Silent on success and, as in the firmware, switches the meter to continuous sending.
        """
        if self._send_request is None:
            raise MeterCommandError(self.meter, "reqSamples is not available on this stream")
        limit = max_request_samples(self.measures)
        if isinstance(n, bool) or not isinstance(n, int) or not 11 <= n <= min(limit, 2000):
            raise MeterCommandError(
                self.meter,
                f"reqSamples: samples={n!r} is not allowed; allowed: 11..{limit} for "
                f"{self.measures.name} (1029-byte send buffer, §5.2)",
            )
        await self._send_request(n)
        self._paused_since = None  # reqSamples sets rts=true for good (§5.2)

    def buffer_fill_estimate(self) -> BufferFill:
        """Estimate of the meter's ring-buffer fill while paused (§4.10).

        From rate × time paused minus what arrived since; logs a warning above 50 %.
        """
        bytes_per_second = self.rate * self.measures.bytes_per_sample
        if self._paused_since is None:
            return BufferFill(0, 0.0, math.inf)
        elapsed = time.monotonic() - self._paused_since
        arrived = (self.received_samples - self._received_at_pause) * self.measures.bytes_per_sample
        filled = max(0, int(bytes_per_second * elapsed) - arrived)
        fraction = filled / RING_BUFFER_BYTES
        remaining = max(0.0, (RING_BUFFER_BYTES - filled) / bytes_per_second)
        if fraction > BUFFER_WARN_FRACTION and not self._warned_fill:
            self._warned_fill = True
            logger.warning(
                "%s: paused meter's ring buffer is about %.0f %% full; it reboots on overflow "
                "in about %.1f s (§4.10)",
                self.meter,
                100 * fraction,
                remaining,
            )
        elif fraction <= BUFFER_WARN_FRACTION:
            self._warned_fill = False
        return BufferFill(filled, fraction, remaining)
