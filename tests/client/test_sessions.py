"""Sampling sessions over every transport, against the emulator, reconciled at stop."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    MeterCommandError,
    MeterCommandRejected,
    MeterConnectionError,
    SampleConfig,
    StreamServer,
    open_raw_stream,
)
from smartmeter_ophyd.protocol import Measures, Transport


async def collect(session, seconds: float):
    blocks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            block = await session.next_block(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            break
        if block is None:
            break
        blocks.append(block)
    return blocks


def check_values(blocks, channels: int) -> np.ndarray:
    values = np.concatenate([b.values for b in blocks]) if blocks else np.empty((0, channels))
    assert values.dtype == np.float32 and values.shape[1] == channels
    assert np.isfinite(values).all()
    return values


async def test_tcp_session_reconciles(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(SampleConfig(rate=4000))
        assert session.channels == Measures.VI.channels
        blocks = await collect(session, 0.6)
        summary = await session.stop()
        blocks += session.drain_nowait()
        values = check_values(blocks, 6)
        packets = np.concatenate([b.packets for b in blocks])
        assert packets[0] == 0 and (np.diff(packets.astype(np.int64)) == 1).all()
        assert values.shape[0] == summary.received_samples
        assert summary.ended_by == "stop" and summary.explained
        assert summary.device_sent_samples == summary.received_samples
        assert summary.missing_declared == 0 and summary.unexplained == 0
        assert 3000 < summary.avg_rate < 5000
        # voltages look like mains (v_l1 within +-400 V, not zero-filled)
        assert 100 < np.abs(values[:, 0]).max() < 400
        assert client.session is None
        assert (await client.get_info()).state == "idle"


async def test_wait_for_samples_returns_as_the_count_arrives_not_as_it_is_read(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(SampleConfig(rate=4000))
        # nobody reads the blocks: the count still advances as the frames are decoded
        assert await asyncio.wait_for(session.wait_for_samples(2000), 5.0)
        arrived = session.received_samples
        assert 2000 <= arrived < 2000 + 0.25 * 4000  # within a read batch of the count
        assert session.queued_blocks > 0  # none of it consumed
        assert await asyncio.wait_for(session.wait_for_samples(1000), 0.01)  # at once
        waiter = asyncio.ensure_future(session.wait_for_samples(10**9))
        cancelled = asyncio.ensure_future(session.wait_for_samples(10**9))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert not waiter.done()
        summary = await session.stop()
        # the session's end releases every waiter, without the count
        assert await asyncio.wait_for(waiter, 1.0) is False
        assert await asyncio.wait_for(session.wait_for_samples(10**9), 0.01) is False
        assert summary.received_samples >= arrived


async def test_udp_session_declares_dropped_datagrams(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(transport="UDP", rate=8000, measures="v,i_L1")
        assert session.reply.port and session.reply.port > 0  # port 0 -> a free one was sent
        first = await collect(session, 0.3)
        meter.drop_udp_datagrams(3)
        rest = await collect(session, 0.4)
        summary = await session.stop()
        blocks = first + rest + session.drain_nowait()
        gaps = [g for b in blocks for g in b.gaps]
        assert [g.kind for g in gaps] == ["packet-gap"]
        chunk_samples = session.reply.chunk_size // Measures.VI_L1.bytes_per_sample
        assert gaps[0].received_packet - gaps[0].expected_packet == 3
        assert gaps[0].missing_samples == 3 * chunk_samples
        assert summary.missing_declared == 3 * chunk_samples
        # device counts the dropped datagrams as sent: sent = received + declared missing
        assert summary.device_sent_samples == summary.received_samples + summary.missing_declared
        assert summary.explained, summary.notes
        check_values(blocks, 2)


async def test_udp_port_given_explicitly_is_used(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        import socket

        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        session = await client.sample(transport=Transport.UDP, rate=1000, port=port)
        assert session.reply.port == port
        assert await collect(session, 0.3)
        await session.stop()


async def test_log_line_inside_frame_is_repaired(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        lines = []
        client.subscribe_logs(lines.append)
        session = await client.sample(rate=8000)
        await collect(session, 0.2)
        meter.inject_log_in_next_frame("NTP synced with conf: 7")
        await collect(session, 0.3)
        summary = await session.stop()
        assert summary.repaired_frames == 1
        assert any(line.text == "NTP synced with conf: 7" for line in lines)
        assert summary.explained


async def test_garbage_before_frames_is_counted_not_delivered(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(rate=8000)
        await collect(session, 0.2)
        meter.inject_garbage(b"\x00garbage\xff" * 3)
        await collect(session, 0.3)
        summary = await session.stop()
        assert summary.skipped_bytes >= 30
        assert summary.explained, summary.notes


async def test_flow_control_pause_estimate_and_request(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(rate=8000, flow_control=True)
        await asyncio.sleep(0.3)
        assert session.drain_nowait() == []  # paused from the start (§5.1)
        fill = session.buffer_fill_estimate()
        assert 0.2 * 8000 * 24 < fill.bytes < 0.6 * 8000 * 24
        assert 0 < fill.fraction < 0.03 and 15 < fill.seconds_to_overflow < 20
        with pytest.raises(MeterCommandError, match="11..42"):
            await session.request_samples(43)
        await client.request_samples(20)  # the client-level form of session.request_samples
        blocks = await collect(session, 0.5)
        # one 20-sample frame, then (rts is now true, §5.2) the backlog in full chunks
        assert blocks and blocks[0].first_packet == 0 and blocks[0].frame_samples[0] == 20
        assert blocks[-1].frame_samples[-1] == 42
        await session.cts(False)
        session.drain_nowait()
        await session.cts(True)
        assert await collect(session, 0.3)
        summary = await session.stop()
        assert summary.explained, summary.notes


async def test_second_session_refused_locally(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(rate=1000)
        with pytest.raises(MeterCommandError, match="already running"):
            await client.sample(rate=1000)
        await session.stop()


async def test_connection_drop_mid_session_ends_with_typed_error(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, reconnect_backoff=(0.2, 1.0)
    ) as client:
        events = []
        client.subscribe_events(events.append)
        session = await client.sample(rate=8000)
        received = await collect(session, 0.3)
        meter.drop_connections()
        with pytest.raises(MeterConnectionError, match="smartmeter emu .*connection lost"):
            while await session.next_block(timeout=3.0) is not None:
                pass
        assert session.summary.ended_by == "connection lost"
        assert session.summary.device_sent_samples is None
        assert session.summary.received_samples >= sum(b.n_samples for b in received)
        for _ in range(60):
            if client.connected:
                break
            await asyncio.sleep(0.05)
        assert client.connected
        assert [type(e).__name__ for e in events][:2] == ["ConnectionLost", "Reconnected"]


async def test_overflow_reboot_mid_session(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, reconnect_backoff=(0.2, 1.0)
    ) as client:
        events = []
        client.subscribe_events(events.append)
        meter.ring = type(meter.ring)(24 * 4000)  # a small ring buffer: overflow in 0.5 s
        session = await client.sample(rate=8000, flow_control=True)
        with pytest.raises(MeterConnectionError):
            await session.next_block(timeout=5.0)
        for _ in range(60):
            if any(type(e).__name__ == "Reconnected" for e in events):
                break
            await asyncio.sleep(0.05)
        reconnected = [e for e in events if type(e).__name__ == "Reconnected"]
        assert reconnected and reconnected[0].rebooted is True


async def test_serial_session_over_pty(serial_meter):
    client = AsyncMeterClient.serial(serial_meter.serial_path, timeout=3.0)
    async with client:
        assert client.info.name == "emuser"
        assert client.meter_label == f"smartmeter emuser ({serial_meter.serial_path})"
        assert len((await client.get_voltage()).values) == 3
        session = await client.sample(transport="Serial", rate=1000)
        blocks = await collect(session, 0.5)
        summary = await session.stop()
        assert blocks and all(b.frame_samples.max() == 5 for b in blocks if b.n_samples)
        assert summary.explained, summary.notes
        check_values(blocks + session.drain_nowait(), 6)


async def test_raw_stream_port_54322(meter):
    stream = await open_raw_stream("127.0.0.1", meter.stream_port, name="emu")
    try:
        blocks = await collect(stream, 0.5)
    finally:
        await stream.close()
    values = check_values(blocks, 6)
    assert values.shape[0] == stream.received_samples > 1000
    assert all(b.packets.size == 0 for b in blocks)


async def test_stream_server_dial_in(meter):
    async with StreamServer("127.0.0.1", 0, timeout=3.0) as server:
        meter.config.stream_server_port = server.port
        async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as admin:
            await admin.set_stream_server("127.0.0.1")
        dialled = await server.accept(timeout=10.0)
        try:
            assert dialled.info.name == "emu"
            session = await dialled.sample(rate=2000)  # this side must send sample (§7.2)
            blocks = await collect(session, 0.4)
            summary = await session.stop()
            assert blocks and summary.explained
        finally:
            await dialled.close()


async def test_scheduled_start(synced_meter):
    async with AsyncMeterClient("127.0.0.1", synced_meter.command_port, timeout=3.0) as client:
        with pytest.raises(MeterCommandError, match="20 s ahead"):
            await client.sample(rate=1000, start_time=int(time.time()) + 60)
        start = int(time.time()) + 2
        session = await client.sample(rate=1000, start_time=start)
        assert session.reply.scheduled is not None and session.reply.scheduled.accepted
        assert session.reply.start_ts == float(start)
        assert session.drain_nowait() == []  # still counting down (§6.4)
        block = await session.next_block(timeout=4.0)
        assert block.first_packet == 0 and time.time() >= start - 0.1
        summary = await session.stop()
        assert summary.explained, summary.notes
        assert abs(summary.start_ts - start) < 0.05  # the actual start, from the stop reply


async def test_unsynced_meter_refuses_scheduled_start(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        # the meter's clock never synced: its "now" is far off and the start is refused (§6.4)
        with pytest.raises(MeterCommandRejected, match="Cannot start sampling in"):
            await client.sample(rate=1000, start_time=int(time.time()) + 2)
        assert client.session is None


async def test_restart_mid_session_reports_what_changed(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, reconnect_backoff=(0.2, 1.0)
    ) as client:
        events = []
        client.subscribe_events(events.append)
        session = await client.sample(rate=4000)
        assert (await client.get_info()).state == "busy"  # info is not busy-checked
        await collect(session, 0.2)
        await client.restart()
        with pytest.raises(MeterConnectionError, match="connection lost"):
            while await session.next_block(timeout=3.0) is not None:
                pass
        for _ in range(80):
            if any(type(e).__name__ == "Reconnected" for e in events):
                break
            await asyncio.sleep(0.05)
        reconnected = next(e for e in events if type(e).__name__ == "Reconnected")
        assert reconnected.rebooted is True
        assert reconnected.changes["sampling_rate"] == (4000, 8000)
        assert reconnected.current.state == "idle"


async def test_session_stopped_by_another_client_ends_cleanly(meter):
    async with (
        AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as owner,
        AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as other,
    ):
        session = await owner.sample(rate=2000)
        await collect(session, 0.2)
        stop = await other.stop()  # stop works from any connection (§4.8)
        assert stop.succeeded and stop.sent_samples > 0
        blocks = await collect(session, 3.0)
        assert not session.active
        summary = session.summary
        assert summary.ended_by == "stopped elsewhere" and summary.device_sent_samples is None
        assert summary.received_samples == stop.sent_samples  # every sent sample arrived
        assert await session.next_block() is None
        assert owner.session is None
        assert (await owner.get_voltage()).values  # the connection is fine
        del blocks


async def test_late_reply_after_timeout_does_not_answer_the_next_request():
    from .client_fakes import INFO_LINE, FakePeer

    voltage = b'Info:{"error":false,"cmd":"getVoltage","voltage":[%d,2,3],"unit":"V"}\r\n'
    calls = []

    def answer(line: bytes) -> list[bytes]:
        calls.append(line)
        if len(calls) == 1:
            return []  # the first request stalls: its reply comes late, before the second's
        return [voltage % 1, voltage % 2]

    peer = await FakePeer(INFO_LINE, answer).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=0.3) as client:
            with pytest.raises(TimeoutError):
                await client.get_voltage()
            reply = await client.get_voltage()
            assert reply.values[0] == 2.0  # not the late reply (1) to the timed-out request
    finally:
        await peer.close()


async def test_udp_datagrams_from_other_hosts_are_ignored(meter):
    import socket

    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(transport="UDP", rate=1000)
        await collect(session, 0.2)
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        intruder.bind(("127.0.0.2", 0))  # another loopback address: not the meter
        try:
            forged = b"Data:" + (24).to_bytes(2, "little") + (10**6).to_bytes(4, "little")
            intruder.sendto(forged + bytes(24), ("127.0.0.1", session.reply.port))
        finally:
            intruder.close()
        blocks = await collect(session, 0.3)
        summary = await session.stop()
        assert not any(b.gaps for b in blocks)  # a forged packet number would make a gap
        assert summary.gaps == 0 and summary.explained, summary.notes


async def test_stop_during_countdown_waits_for_the_start(synced_meter):
    async with AsyncMeterClient("127.0.0.1", synced_meter.command_port, timeout=3.0) as client:
        start = int(time.time()) + 2
        session = await client.sample(rate=1000, start_time=start)
        summary = await session.stop()  # immediately: the countdown cannot be cancelled
        assert time.time() >= start
        assert summary.ended_by == "stop" and summary.device_sent_samples is not None
        assert summary.explained, summary.notes
        await asyncio.sleep(0.5)
        assert (await client.get_info()).state == "idle"  # not left sampling to nobody


async def test_udp_without_prefix(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        session = await client.sample(transport="UDP", rate=2000, prefix=False)
        blocks = await collect(session, 0.4)
        summary = await session.stop()
        blocks += session.drain_nowait()
        assert blocks and all(b.packets.size == 0 for b in blocks)  # no numbering, no gaps
        assert summary.received_samples == sum(b.n_samples for b in blocks)
        assert summary.explained, summary.notes


def test_gap_records_name_the_packets_they_declare_missing() -> None:
    from smartmeter_ophyd.client import Gap

    assert Gap("packet-gap", 5, 9, 168).missing_packets == (5, 9)
    assert Gap("corrupt-frame", 7, 7, 42).missing_packets == (7, 8)  # its own packet
    assert Gap("late-packet", 9, 6, 0).missing_packets is None  # declared by an earlier gap
