"""One fly of one meter, as a coroutine on the client's event loop.

Intent: the device's fly path without threads of its own.  A :class:`FlyController` lives on
the loop every :class:`~smartmeter_ophyd.client.MeterClient` of the process shares; the
device turns its futures into ophyd Statuses.  It

1. **arms** the meter (:meth:`arm`): sends ``sample``, checks a scheduled start was accepted
   for the requested second (§6.4), opens the HDF5 writer and starts consuming;
2. **releases** it (:meth:`kickoff`): ``cts true`` for a paused start (§5.1), the first
   ``reqSamples`` pull (§5.2), or nothing; then waits for the first sample, or - for a
   scheduled start - the meter's start;
3. **consumes** blocks with the session's async iterator and writes them (gaps first) on the
   loop's I/O thread, so a slow disk or progress callback never stops the receive path; the
   writer's count is the one count of samples written;
4. **governs** flow: :class:`~._flow.CtsGovernor` decisions for ``cts`` flies, host-paced
   ``reqSamples`` pulls (each followed by ``cts false``, because ``reqSamples`` turns
   continuous sending on, §5.2);
5. **stops** the meter when the target is reached or when asked (:meth:`request_stop`), keeps
   consuming until the stop reply has come (the tail, §4.8), and **finishes**: every block
   received is written whatever went wrong, the writer is closed with the stop summary, and
   :attr:`outcome` carries the summary and, on failure, the cause naming the meter.  Meters
   that end together take turns on the I/O thread, ``finish_first`` ahead (``_finishing``).

Limits: a meter that stops answering entirely is given up on after the client's stop
timeout; what it sent until then is recorded and the rest is unknown (no stop reply).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..client import (
    AsyncMeterClient,
    Block,
    MeterCommandError,
    MeterError,
    MeterTimeoutError,
    SamplingSession,
    SessionSummary,
)
from ..client import SyncRecord as LoggedSync
from ..protocol import LogLine, SampleReply
from ._finishing import finish_turns
from ._flow import CtsGovernor, CtsPolicy, FlowStats
from ._fly import FlyConfig
from ._live import LiveSummary
from ._records import summary_dict

if TYPE_CHECKING:  # h5py and the time model load with the first fly (import-time budget)
    from ..storage import WaveformWriter

logger = logging.getLogger(__name__)

TICK_S: Final = 0.25
"""How often the consumer looks at the watchdog and stop requests while no data comes."""
PULL_PERIOD_S: Final = 0.1
"""How often a ``reqSamples`` fly pulls (each pull flushes the meter's backlog, §5.2)."""
STOP_REPLY_MIN_S: Final = 10.0
"""Shortest wait for the stop reply of a fly (the tail is flushed before it, §4.8)."""
SCHEDULED_START_GRACE_S: Final = 2.0
"""How long after a scheduled second the first sample may take (random wait, NTP, §6.4)."""
PROMPT_BATCHES: Final = 3
"""Read batches before a fly's target sample count from which every arrival is read at
once: the client's batcher looks once a batch, so it has unbatched by the target."""

OTHER_CLIENT_LOG: Final = re.compile(r"Client with IP (\S+) connected on port (\d+)")
"""§2.1: the meter tells connected clients about every new one (text of an INFO log)."""


class FlyError(MeterError):
    """A fly scan did not end with every sample accounted for."""


@dataclass(frozen=True, slots=True)
class FlyOutcome:
    """How a fly ended: the reconciled summary (None without a stop reply) and the cause of a
    failure (None when every sample is accounted for)."""

    summary: SessionSummary | None
    error: BaseException | None
    flow_stats: FlowStats | None
    samples_written: int


class FlyController:
    """Runs one fly of one meter on the client's loop (see the module docstring).

    Every method must be called on that loop.  ``open_writer(reply)`` creates the HDF5
    writer once the sample reply is known; ``on_progress(samples)`` and ``on_log(line)`` are
    called on the loop.
    """

    def __init__(
        self,
        *,
        client: AsyncMeterClient,
        config: FlyConfig,
        open_writer: Callable[[SampleReply], WaveformWriter],
        cts_policy: CtsPolicy,
        silence_s: float,
        on_progress: Callable[[int], None] | None = None,
        on_log: Callable[[LogLine], None] | None = None,
        live: LiveSummary | None = None,
        sync_records: Callable[[], Sequence[tuple[LoggedSync, bool]]] | None = None,
        rtc: bool = True,
    ) -> None:
        self.client = client
        self.config = config
        self.label = client.meter_label
        self._open_writer = open_writer
        self._policy = cts_policy
        self._silence_s = silence_s
        self._on_progress = on_progress
        self._on_log = on_log
        self._live = live
        self._sync_records = sync_records
        self._rtc = rtc
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.outcome: asyncio.Future[FlyOutcome] = loop.create_future()
        self.session: SamplingSession | None = None
        self.writer: WaveformWriter | None = None
        self.reply: SampleReply | None = None
        self.other_clients: list[str] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._arming: asyncio.Task[SampleReply] | None = None
        self._helpers: list[asyncio.Task[None]] = []
        self._stop_task: asyncio.Task[SessionSummary] | None = None
        self._stop_reason: str | None = None
        self._released = asyncio.Event()
        self._governor: CtsGovernor | None = None
        self._cause: BaseException | None = None
        self._write_error: BaseException | None = None
        self._unwritten = 0
        self._last_data = time.monotonic()

    # ------------------------------------------------------------------ public, on the loop

    @property
    def running(self) -> bool:
        return not self.outcome.done()

    async def arm(self) -> SampleReply:
        """Send ``sample`` and start consuming; the reply once the meter accepted it.

        Raises the client's error (the meter's own message for a refused ``sample``).  Sent
        once: later calls wait for the same reply, because a scheduled start cannot be
        cancelled and a second ``sample`` could start the meter twice (§6.4).
        """
        if self._arming is None:
            self._arming = asyncio.get_running_loop().create_task(self._arm())
        return await asyncio.shield(self._arming)

    async def _arm(self) -> SampleReply:
        self._unsubscribe = self.client.subscribe_logs(self._log)
        try:
            session = await self.client.sample(self.config.sample_config())
        except BaseException as exc:
            self._release_logs()
            if not self.outcome.done():
                self.outcome.set_result(FlyOutcome(None, exc, None, 0))
            self._fail_started(exc)
            raise
        self.session = session
        self.reply = reply = session.reply
        loop = asyncio.get_running_loop()
        try:
            if self.config.start_time is not None and reply.start_ts != float(self.config.start_time):
                raise FlyError(
                    self.label,
                    f"the meter scheduled its start at startTs {reply.start_ts!r}, not at the "
                    f"requested {self.config.start_time}.000 (§6.4)",
                )
            self.writer = await loop.run_in_executor(None, self._open_writer, reply)
            if self._live is not None:
                self._live.start(reply.measures, reply.sampling_rate, self.writer.start_ts)
        except BaseException as exc:
            self._cause = exc
            self._task = loop.create_task(self._finish_without_consuming())
            raise
        if self.config.flow_control == "cts":
            self._governor = CtsGovernor(
                self._policy, rate=session.rate,
                chunk_samples=max(1, reply.chunk_size // session.measures.bytes_per_sample),
                bytes_per_sample=session.measures.bytes_per_sample, label=self.label,
            )
        target = self.config.target_samples
        if target is not None and isinstance(self.client, AsyncMeterClient):
            # read unbatched over the last batches before the target, so the stop goes out
            # as the target arrives, not up to a batch later
            ahead = int(PROMPT_BATCHES * self.client.batch_s * session.rate)
            session.prompt_from = max(0, target - ahead)
        if not self.config.starts_paused:
            self._released.set()
        self._last_data = time.monotonic()
        self._task = loop.create_task(self._run(), name=f"fly {self.label}")
        return reply

    async def kickoff(self) -> None:
        """Release a paused start and wait until the meter really sampled."""
        await self.arm()
        await self._release()
        limit = self._first_sample_limit()
        try:
            await asyncio.wait_for(asyncio.shield(self.started), limit)
        except TimeoutError:
            error = MeterTimeoutError(
                self.label, f"kickoff: no sample within {limit:.1f} s of the release"
            )
            self._cause = self._cause or error
            self.request_stop("no first sample")
            raise error from None

    def request_stop(self, reason: str = "requested") -> None:
        """Stop the meter (once); consumption goes on until the stop reply (§4.8)."""
        if self._stop_task is not None or self.session is None or not self.session.active:
            return
        self._stop_reason = reason
        logger.info("%s: stopping the meter (%s)", self.label, reason)
        self._stop_task = asyncio.get_running_loop().create_task(self._stop_session())

    @property
    def stop_reason(self) -> str | None:
        """Why this device asked the meter to stop (None: it did not ask)."""
        return self._stop_reason

    def stop_record(self, summary: SessionSummary) -> dict[str, Any]:
        """The stop summary as stored (the file's ``stop_summary`` attribute, the device's
        ``stop_summary`` signal): the session's counts and who asked the meter to stop."""
        return {**summary_dict(summary), "stop_requested": self._stop_reason}

    async def wait(self) -> FlyOutcome:
        return await asyncio.shield(self.outcome)

    def flow_stats(self) -> FlowStats | None:
        return None if self._governor is None else self._governor.stats(time.monotonic())

    # ------------------------------------------------------------------ internals

    def _log(self, line: LogLine) -> None:
        match = OTHER_CLIENT_LOG.fullmatch(line.text)
        if match is not None:
            self.other_clients.append(f"{match.group(1)}:{match.group(2)}")
        if self._on_log is not None:
            self._on_log(line)

    def _release_logs(self) -> None:
        if self._unsubscribe is not None:
            try:
                self._unsubscribe()
            except Exception as exc:  # bookkeeping only; the fly's outcome stands
                logger.warning("%s: could not unsubscribe from logs: %s", self.label, exc)
            self._unsubscribe = None

    def _fail_started(self, exc: BaseException) -> None:
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()  # retrieved: the outcome reports it

    def _first_sample_limit(self) -> float:
        limit = self._silence_s
        if self.config.start_time is not None:
            limit += max(0.0, self.config.start_time - time.time()) + SCHEDULED_START_GRACE_S
        if self.config.slot is not None:
            limit += float(self.config.slot[1])
        return limit

    async def _release(self) -> None:
        session = self.session
        assert session is not None
        if self._released.is_set():
            return
        if self.config.flow_control == "cts" and self.config.slot is None:
            received = session.received_samples
            await session.cts(True)
            assert self._governor is not None
            self._governor.resumed_at(time.monotonic(), received_before=received, fill_samples=0)
        elif self.config.flow_control == "reqSamples" and self._seconds_to_start() <= 0:
            await self._pull()  # a scheduled start is pulled from once it began (_puller)
        self._last_data = time.monotonic()
        self._released.set()

    async def _stop_session(self) -> SessionSummary:
        session = self.session
        assert session is not None
        # The reply comes after the meter flushed its whole backlog (§4.8), which a stalled
        # link delays: wait for it well past the silence limit, so the tail is recorded.
        return await session.stop(timeout=max(STOP_REPLY_MIN_S, 2 * self._silence_s))

    async def _pull(self) -> None:
        """One host-paced pull: ``reqSamples`` then ``cts false`` (§5.2)."""
        session = self.session
        assert session is not None and self.config.request_size is not None
        await session.request_samples(self.config.request_size)
        await session.cts(False)

    async def _run(self) -> None:
        session = self.session
        assert session is not None
        loop = asyncio.get_running_loop()
        if self._governor is not None:
            self._helpers.append(loop.create_task(self._govern()))
        if self.config.flow_control == "reqSamples":
            self._helpers.append(loop.create_task(self._puller()))
        target = self.config.target_samples
        if target is not None:
            self._helpers.append(loop.create_task(self._stop_on_arrival(session, target)))
        try:
            await self._consume(session)
        except MeterError as exc:
            self._cause = self._cause or exc
        except asyncio.CancelledError:
            self._cause = self._cause or FlyError(self.label, "the fly was cancelled")
            raise
        except Exception as exc:
            logger.exception("%s: the fly failed unexpectedly", self.label)
            self._cause = self._cause or exc
        finally:
            for task in self._helpers:
                task.cancel()
            await self._finish(session)

    async def _stop_on_arrival(self, session: SamplingSession, target: int) -> None:
        """Stop the meter as its target arrives: counted as the frames are decoded, not when
        the consumer reads them, which waits for the I/O thread between batches (on a busy
        host, behind the other meters' writes) while the meter samples on."""
        if await session.wait_for_samples(target):
            self.request_stop(f"{target} samples reached")

    async def _consume(self, session: SamplingSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                block = await session.next_block(TICK_S)
            except MeterTimeoutError:
                self._check_silence(session)
                if self._stop_failed():
                    return
                continue
            if block is None:
                return
            batch = [block, *session.drain_nowait()]
            await loop.run_in_executor(None, self._write, batch)
            self._last_data = time.monotonic()
            written = self.writer.samples_appended if self.writer is not None else 0
            if written and not self.started.done():
                self.started.set_result(None)
            if self._write_error is not None:
                self.request_stop("the HDF5 file cannot be written")

    def _stop_failed(self) -> bool:
        task = self._stop_task
        if task is None or not task.done() or task.cancelled():
            return False
        exc = task.exception()
        if exc is None:
            return False
        self._cause = self._cause or exc
        return True

    def _check_silence(self, session: SamplingSession) -> None:
        if self._stop_task is not None:
            return
        if not self._released.is_set() or (self._governor is not None and self._governor.paused):
            self._last_data = time.monotonic()
            return
        limit = self._silence_s if self.started.done() else self._first_sample_limit()
        if self.config.slot is not None:
            limit += float(self.config.slot[1])
        silent = time.monotonic() - self._last_data
        if silent > limit:
            self._cause = MeterTimeoutError(
                self.label, f"no sample data for {silent:.1f} s during the fly"
            )
            self.request_stop("silence")

    def _write(self, blocks: list[Block]) -> None:
        """On the I/O thread: gaps, then samples, of each block in order."""
        writer = self.writer
        assert writer is not None
        for block in blocks:
            if self._write_error is not None:
                self._unwritten += block.n_samples
                continue
            try:
                for gap in block.gaps:
                    span = gap.missing_packets
                    if span is None:
                        logger.warning(
                            "%s: late or duplicate packet %s (%d samples) not inserted",
                            self.label, gap.received_packet,
                            0 if gap.late_values is None else gap.late_values.shape[0],
                        )
                        continue
                    writer.record_gap(*span, gap.missing_samples)
                if block.n_samples:
                    if block.packets.size:
                        writer.append(block.values, block.packets, block.frame_samples)
                    else:  # an unnumbered stream (MQTT, §4.14): no packet table rows
                        writer.append(block.values)
                    if self._live is not None:
                        self._live.add(block.values)
            except (OSError, RuntimeError, ValueError) as exc:
                self._write_error = FlyError(
                    self.label, f"cannot write {writer.path}: {exc}; the meter was stopped"
                )
                self._unwritten += block.n_samples
                logger.error("%s", self._write_error)
        if self._on_progress is not None:
            # Here, not on the loop: a slow progress callback slows the writer, never the
            # receive path, and flow control sees it as a slow consumer.
            self._on_progress(writer.samples_appended + self._unwritten)

    async def _govern(self) -> None:
        session = self.session
        governor = self._governor
        assert session is not None and governor is not None
        await self._released.wait()
        while session.active and self._stop_task is None:
            await asyncio.sleep(self._policy.poll_s)
            consumed = (self.writer.samples_appended if self.writer else 0) + self._unwritten
            received = session.received_samples
            decision = governor.decide(
                time.monotonic(), received=received, consumed=consumed,
                fill=session.buffer_fill_estimate(),
            )
            if decision is None or self._stop_task is not None:
                continue
            ready, _reason, fill_samples = decision
            try:
                await session.cts(ready)
            except MeterError as exc:
                if session.active and self._stop_task is None:
                    logger.warning("%s: flow control stopped: %s", self.label, exc)
                return
            now = time.monotonic()
            if ready:
                governor.resumed_at(now, received_before=received, fill_samples=fill_samples)
            else:
                governor.paused_at(now)

    def _seconds_to_start(self) -> float:
        """Host-clock seconds until a scheduled start (0 for an immediate one)."""
        if self.config.start_time is None:
            return 0.0
        return max(0.0, self.config.start_time - time.time())

    async def _puller(self) -> None:
        session = self.session
        assert session is not None
        await self._released.wait()
        # §5.2: reqSamples is refused until the meter samples; a scheduled start (§6.4) only
        # begins at its second
        await asyncio.sleep(self._seconds_to_start())
        while session.active and self._stop_task is None:
            await asyncio.sleep(PULL_PERIOD_S)
            if self._stop_task is not None or not session.active:
                return
            try:
                await self._pull()
            except MeterError as exc:
                if session.active and self._stop_task is None:
                    logger.warning("%s: reqSamples pulls stopped: %s", self.label, exc)
                return

    async def _finish_without_consuming(self) -> None:
        session = self.session
        if session is not None:
            await self._finish(session)

    async def _finish(self, session: SamplingSession) -> None:
        """Stop the meter if it still runs, keep everything received, close the file."""
        loop = asyncio.get_running_loop()
        if session.active and self.client.connected:
            self.request_stop(self._stop_reason or "the fly ends")
        if self._stop_task is not None:
            try:
                await asyncio.shield(self._stop_task)
            except MeterError as exc:
                logger.warning("%s: stop failed: %s", self.label, exc)
                self._cause = self._cause or exc
            except asyncio.CancelledError:
                pass
        samples = 0
        # the I/O thread finishes one file after another; a meter marked finish_first (the
        # alignment's reference) goes ahead of those still waiting (``_finishing``)
        async with finish_turns(loop).turn(first=self.config.finish_first):
            remaining = session.drain_nowait()
            if remaining and self.writer is not None:
                await loop.run_in_executor(None, self._write, remaining)
            summary = session.summary
            if self._write_error is not None:
                self._cause = self._cause or self._write_error
            if self.writer is not None:
                samples = await loop.run_in_executor(None, self._close_writer, summary)
        self._release_logs()
        error = self._judge(summary)
        if error is not None:
            self._fail_started(error)
        elif not self.started.done():
            self._fail_started(FlyError(
                self.label,
                f"the fly ended before any sample arrived ({summary.ended_by if summary else '?'})",
            ))
        if not self.outcome.done():
            self.outcome.set_result(FlyOutcome(summary, error, self.flow_stats(), samples))

    def _close_writer(self, summary: SessionSummary | None) -> int:
        writer = self.writer
        assert writer is not None
        if self._live is not None:
            self._live.finish()
        if writer.closed:
            return writer.samples_written
        try:
            modelled = summary is not None and self._model_times(writer, summary)
            actual = summary.start_ts if summary is not None else None
            if actual is not None and math.isfinite(actual) and actual != writer.start_ts:
                if self.config.start_time is None:
                    logger.warning(
                        "%s: the stop reply's start_ts %.3f differs from the sample reply's "
                        "startTs %.3f of an immediate start (§4.4 says they match); using "
                        "the stop reply's", self.label, actual, writer.start_ts,
                    )
                # the model's /time already stands on it: record the origin, rewrite nothing
                writer.rebase_start(actual, rewrite=not modelled)
            writer.close(None if summary is None else self.stop_record(summary))
        except (OSError, RuntimeError, ValueError) as exc:
            self._cause = self._cause or FlyError(
                self.label, f"cannot close {writer.path}: {exc}"
            )
            try:
                writer.abandon()
            except Exception as abandon_exc:  # the file is unusable either way
                logger.warning("%s: %s", self.label, abandon_exc)
        return writer.samples_written

    def _model_times(self, writer: WaveformWriter, summary: SessionSummary) -> bool:
        """Rewrite ``/time`` from the meter's own records (the time model, §4.10, §6.5).

        Without a stop reply's ``start_ts`` or a meter clock set by NTP the provisional axis
        stays.  A model that fails is logged and leaves the provisional axis: the samples are
        never at stake.
        """
        from ..timing import DeclaredGap, SessionRecords, model_times
        from ..timing import SyncRecord as ModelSync

        start = summary.start_ts
        if start is None or not math.isfinite(start) or start <= 0 or writer.samples_appended == 0:
            return False
        logged = list(self._sync_records()) if self._sync_records is not None else []
        syncs = tuple(
            ModelSync(
                to_ts=r.to_ts, total=r.total_samples, goal=r.goal_samples,
                offset_s=r.offset_s, confidence_ms=r.confidence_ms, correction=r.correction,
                second_interrupts=r.second_interrupts, sets_rtc=sets_rtc,
            )
            for r, sets_rtc in logged
            if r.during_sampling and r.to_ts is not None and r.total_samples is not None
            and r.goal_samples is not None and r.offset_s is not None
        )
        gaps = tuple(DeclaredGap(index=g[0], missing=g[3]) for g in writer.gaps)
        measures = writer.measures
        records = SessionRecords(
            meter=self.label, rate=writer.rate, start_ts=start,
            received=writer.samples_appended, syncs=syncs, gaps=gaps,
            latched=measures.latched and self.config.start_time is None, rtc=self._rtc,
            samples=summary.device_samples, sent_samples=summary.device_sent_samples,
            stop_ts=summary.stop_ts,
        )
        try:
            modelled = model_times(records)
        except Exception as exc:  # the provisional axis stays; say why
            logger.warning("%s: the time model failed (%s); %s keeps the nominal time axis",
                           self.label, exc, writer.path)
            return False
        writer.rewrite_times(modelled.times, "time model", modelled.notes)
        return True

    def _judge(self, summary: SessionSummary | None) -> BaseException | None:
        if self._cause is not None and self._cause is self._write_error:
            return self._unwritten_error(summary)
        if self._cause is not None:
            return self._cause
        if summary is None:
            return FlyError(self.label, "the fly ended without a stop summary")
        writer = self.writer
        if writer is not None and writer.samples_appended != summary.received_samples:
            return FlyError(
                self.label,
                f"the client received {summary.received_samples} samples but only "
                f"{writer.samples_appended} reached {writer.path}",
            )
        if not summary.explained:
            reason = "samples not accounted for: " + "; ".join(summary.notes)
            if summary.ended_by == "stopped elsewhere":
                others = ", ".join(self.other_clients) or "none seen (it may have connected earlier)"
                reason = (
                    "the meter stopped sampling without this device asking: another connection "
                    f"sent stop (§4.8); other clients that connected during the fly: {others}; "
                    + reason
                )
            elif summary.ended_by == "connection lost":
                reason = "the connection to the meter was lost during the fly; " + reason
            return FlyError(self.label, reason)
        return None


    def _unwritten_error(self, summary: SessionSummary | None) -> FlyError:
        """The write error, declaring how many received samples never reached the file."""
        writer, error = self.writer, self._write_error
        assert writer is not None and isinstance(error, FlyError)
        received = (summary.received_samples if summary is not None
                    else writer.samples_appended + self._unwritten)
        written = writer.samples_written
        return FlyError(self.label, (
            f"{error.detail}; {received - written} of {received} received samples were not "
            f"written (the file holds the first {written})"
        ))


def check_not_running(controller: FlyController | None, label: str, what: str) -> None:
    if controller is not None and controller.running:
        raise MeterCommandError(label, f"{what}: a fly is still running (stop it first)")
