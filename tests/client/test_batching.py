"""Read batching (SO_RCVLOWAT) of a full-rate TCP session, against the emulator.

The mark must be raised only while the stream runs at full rate, dropped before every
command (replies stay prompt), dropped when the stream stalls (liveness), and never lose
or hold back samples: every session here reconciles with the meter's own counts.
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest

from smartmeter_ophyd.client import AsyncMeterClient, MeterConnectionError, SampleConfig
from smartmeter_ophyd.client._batcher import BATCH_MIN_BYTES
from smartmeter_ophyd.emulator import EmulatedMeter

from .client_fakes import emulator_config

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_RCVLOWAT batching is Linux epoll behaviour"
)

BATCH_S = 0.5
"""Long enough that a reply waiting for a full batch would be obvious (>= 0.5 s late)."""
PROMPT_S = 0.3


async def wait_batching(client: AsyncMeterClient, raises: int = 1, limit: float = 4.0) -> None:
    """Until the client has raised its low-water mark ``raises`` times and it is up."""
    deadline = time.monotonic() + limit
    while client.batch_raises < raises or client.receive_low_water <= 1:
        assert time.monotonic() < deadline, "read batching never switched on"
        await asyncio.sleep(0.05)


async def bytes_per_read(client: AsyncMeterClient, seconds: float) -> float:
    """Mean bytes per socket read over the next ``seconds``."""
    reads, received = client.reads, client.bytes_received
    await asyncio.sleep(seconds)
    return (client.bytes_received - received) / max(1, client.reads - reads)


async def consume(session, into: list) -> None:
    async for block in session:
        into.append(block)


def check_contiguous(blocks, summary) -> None:
    packets = np.concatenate([b.packets for b in blocks])
    assert packets[0] == 0 and (np.diff(packets.astype(np.int64)) == 1).all()
    assert sum(b.n_samples for b in blocks) == summary.received_samples


async def test_batched_session_is_lossless_and_stop_is_prompt(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await wait_batching(client)
        assert await bytes_per_read(client, 1.2) >= BATCH_MIN_BYTES  # per batch, not segment
        started = time.monotonic()
        summary = await session.stop()
        stop_took = time.monotonic() - started
        await consumer
        assert stop_took < PROMPT_S, f"stop reply waited {stop_took:.2f} s behind the batch"
        assert client.receive_low_water == 1
        assert summary.ended_by == "stop" and summary.explained
        assert summary.device_sent_samples == summary.received_samples
        check_contiguous(blocks, summary)


async def test_commands_stay_prompt_and_batching_resumes(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        for round_ in range(1, 3):
            await wait_batching(client, raises=round_)
            started = time.monotonic()
            info = await client.get_info()
            assert time.monotonic() - started < PROMPT_S
            assert info.is_smartmeter
            started = time.monotonic()
            await session.cts(True)
            assert time.monotonic() - started < PROMPT_S
        summary = await session.stop()
        await consumer
        assert client.batch_raises >= 2 and summary.explained
        check_contiguous(blocks, summary)


async def test_reads_are_prompt_from_the_sessions_prompt_count_on(meter):
    """A consumer that stops at a sample count sets ``prompt_from``: from there on every
    arrival is read at once, so the count is seen when it arrives, not a batch later."""
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await wait_batching(client)
        session.prompt_from = session.received_samples + 4000  # half a second on
        while session.received_samples < session.prompt_from:
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + BATCH_S + PROMPT_S  # the batcher looks once a batch
        while client.receive_low_water > 1:
            assert time.monotonic() < deadline, "still batched past the prompt count"
            await asyncio.sleep(0.01)
        raises = client.batch_raises
        for _ in range(3):  # and stays unbatched
            await asyncio.sleep(BATCH_S)
            assert client.receive_low_water == 1
        assert await bytes_per_read(client, 0.5) < BATCH_MIN_BYTES  # read per arrival again
        summary = await session.stop()
        await consumer
        assert client.batch_raises == raises and summary.explained
        check_contiguous(blocks, summary)


async def test_stalled_stream_is_read_without_waiting_for_a_batch(meter):
    """Another client stops the meter: the stream stalls below the mark; the stall timer
    drops it, the tail is read, the idle lifeness line ends the session -- nothing lost."""
    async with (
        AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S) as ours,
        AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as other,
    ):
        session = await ours.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await wait_batching(ours)
        stop_reply = await other.stop()
        await asyncio.wait_for(consumer, 3 * BATCH_S + 2.5)
        summary = session.summary
        assert summary is not None and summary.ended_by == "stopped elsewhere"
        assert ours.receive_low_water == 1
        assert stop_reply.sent_samples == summary.received_samples
        check_contiguous(blocks, summary)


async def test_slow_stream_is_not_batched(meter):
    """1 kHz is ~24 kB/s: 0.5 s of it is under the 16 KiB minimum batch, so no batching
    (it would hold samples back for longer than batch_s)."""
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        session = await client.sample(SampleConfig(rate=1000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await asyncio.sleep(4 * BATCH_S)
        assert client.batch_raises == 0
        summary = await session.stop()
        await consumer
        assert summary.explained
        check_contiguous(blocks, summary)


async def test_batching_off(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=0
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        await asyncio.sleep(3 * BATCH_S)
        assert client.batch_raises == 0
        assert client.receive_low_water == 1
        summary = await session.stop()
        assert summary.explained


def test_negative_batch_is_refused():
    with pytest.raises(ValueError, match="batch_s"):
        AsyncMeterClient("127.0.0.1", 1, batch_s=-0.1)


async def test_meter_stall_drops_the_mark_and_batching_resumes(meter):
    """The meter's loop blocks for 2 s (> 3 x batch_s: the shared loop timer notices a stall
    1.5 to 3 batch_s after the last read): the mark drops; the backlog it then writes at once
    brings batching back; no frame is lost or declared missing."""
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await wait_batching(client)
        dropped: list[float] = []
        meter.stall_output(2.0)
        stalled_at = time.monotonic()
        while client.receive_low_water > 1:
            assert time.monotonic() - stalled_at < 3.0, "the mark stayed up through a stall"
            await asyncio.sleep(0.02)
        dropped.append(time.monotonic() - stalled_at)
        await wait_batching(client, raises=2)
        summary = await session.stop()
        await consumer
        assert dropped[0] < 3 * BATCH_S + 0.3
        assert summary.explained and summary.missing_declared == 0
        check_contiguous(blocks, summary)


async def test_connection_drop_is_seen_at_once_while_batched(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S, reconnect=False
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await wait_batching(client)
        dropped_at = time.monotonic()
        meter.drop_connections()
        with pytest.raises(MeterConnectionError):
            await consumer
        assert time.monotonic() - dropped_at < PROMPT_S
        assert session.summary is not None and session.summary.ended_by == "connection lost"
        assert sum(b.n_samples for b in blocks) == session.summary.received_samples


async def test_log_line_inside_a_frame_is_repaired_while_batched(meter):
    """Held frames are proven by the next batch, never released unverified (§4.6)."""
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        session = await client.sample(SampleConfig(rate=8000))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        await wait_batching(client)
        for _ in range(3):
            meter.inject_log_in_next_frame("batched read repair test")
            await asyncio.sleep(0.4)
        summary = await session.stop()
        await consumer
        assert summary.repaired_frames == 3 and summary.corrupt_frames == 0
        assert summary.explained and summary.skipped_bytes == 0
        check_contiguous(blocks, summary)


async def test_scheduled_start_batches_only_once_streaming(synced_meter):
    async with AsyncMeterClient(
        "127.0.0.1", synced_meter.command_port, timeout=3.0, batch_s=BATCH_S
    ) as client:
        start = int(time.time()) + 2
        session = await client.sample(SampleConfig(rate=8000, start_time=start))
        blocks: list = []
        consumer = asyncio.create_task(consume(session, blocks))
        while time.time() < start - 0.3:
            assert client.batch_raises == 0  # counting down: nothing to batch
            await asyncio.sleep(0.1)
        await wait_batching(client, limit=3.0)
        started = time.monotonic()
        summary = await session.stop()
        assert time.monotonic() - started < PROMPT_S
        await consumer
        assert summary.explained
        check_contiguous(blocks, summary)


async def test_one_tick_reads_every_batched_meter(meter):
    """The loop's shared tick reads all batched meters in one callback (one wake-up for
    all, no readiness round per meter): a task polling both clients' read counters never
    sees one meter read without the other, and every session still reconciles."""
    second = EmulatedMeter(emulator_config())
    await second.start()
    changes: list[tuple[bool, bool]] = []
    try:
        async with (
            AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0, batch_s=BATCH_S) as a,
            AsyncMeterClient("127.0.0.1", second.command_port, timeout=3.0, batch_s=BATCH_S) as b,
        ):
            sessions = [await a.sample(SampleConfig(rate=8000)),
                        await b.sample(SampleConfig(rate=8000))]
            blocks: list[list] = [[], []]
            consumers = [asyncio.create_task(consume(s, into)) for s, into in zip(sessions, blocks, strict=True)]
            for client in (a, b):
                await wait_batching(client)
            before = (a.reads, b.reads)
            deadline = time.monotonic() + 6 * BATCH_S
            while time.monotonic() < deadline:
                await asyncio.sleep(0.005)
                now = (a.reads, b.reads)
                if now != before:
                    changes.append((now[0] != before[0], now[1] != before[1]))
                before = now
            summaries = [await s.stop() for s in sessions]
            await asyncio.gather(*consumers)
    finally:
        await second.stop()
    assert len(changes) >= 4, changes
    together = sum(1 for change in changes if change == (True, True))
    assert together >= 0.8 * len(changes), changes  # a late tick may let the kernel wake one
    for summary, got in zip(summaries, blocks, strict=True):
        assert summary.explained
        check_contiguous(got, summary)
