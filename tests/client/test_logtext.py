"""Log-text parsers and the sync-record assembler on the firmware's own texts, and live on an
emulated meter whose time server is off by a known amount (§6.2, §6.5)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    MeterCommandRejected,
    SyncRecord,
    SyncRecordAssembler,
    missed_samples,
    ntp_average_rate,
    ntp_confidence_ms,
    ntp_offset,
    ntp_sample_counts,
    overflow_lost_samples,
    rate_report,
    sampling_correction,
    sync_from_timestamp,
    sync_to_timestamp,
)
from smartmeter_ophyd.emulator import _texts as texts
from smartmeter_ophyd.emulator._meter import EmulatedMeter
from smartmeter_ophyd.protocol import (
    LogLevel,
    LogLine,
    StreamDecoder,
    encode_log_line,
    format_timestamp,
    server_reply,
)

from .client_fakes import emulator_config

T0 = 1_700_000_000.0


def test_parsers_on_verbatim_texts():
    assert ntp_confidence_ms("NTP synced with conf: 12") == 12
    assert ntp_confidence_ms(LogLine(LogLevel.INFO, "03/02 10:42:24", "NTP synced with conf: 3")) == 3
    assert ntp_confidence_ms("NTP synced with conf: x") is None
    assert sampling_correction("Correcting: -7 samples") == -7
    assert sampling_correction("Correcting: 10 samples") == 10
    assert overflow_lost_samples("Overflow during ringBuffer write, lost 152917 samples") == 152917
    assert missed_samples("MISSED 3 SAMPLES") == 3
    report = rate_report("7999.87Hz, 80000s")
    assert report is not None and report.measured_rate == 7999.87 and report.total_samples == 80000
    offset = ntp_offset("Offset of -0.012 s, SecondInterrupts 61, SamplingDur 61.004")
    assert offset is not None and offset.offset_s == -0.012 and offset.second_interrupts == 61
    assert offset.sampling_duration_s == 61.004
    assert ntp_average_rate("After NTP Sync: avg rate 7999.873 Hz") == 7999.873
    counts = ntp_sample_counts("Should be: 488032, is 488022 samples")
    assert counts is not None and (counts.goal_samples, counts.total_samples) == (488032, 488022)
    assert sync_from_timestamp("From 1614697441.119") == 1614697441.119
    assert sync_to_timestamp("To 1614697502.123") == 1614697502.123
    assert sync_from_timestamp("From 0.000") == 0.0
    # "To much clients" (§12 item 5) is not a sync record's To line
    assert sync_to_timestamp(texts.TOO_MANY_CLIENTS) is None
    parsers = (ntp_confidence_ms, sampling_correction, overflow_lost_samples, rate_report,
               ntp_average_rate, ntp_sample_counts, ntp_offset, sync_from_timestamp,
               sync_to_timestamp)
    for parser in parsers:
        assert parser("") is None  # the lifeness line


# --------------------------------------------------------------------- record texts


def _line(text: str, level: LogLevel = LogLevel.INFO) -> LogLine:
    return LogLine(level, "03/02 10:42:24", text)


def _record_lines(
    conf: int, rate: int, total: int, duration: float, start_ts: float, *, rtc: bool = True
) -> tuple[list[LogLine], dict[str, Any]]:
    """The lines the emulator writes for one sync while sampling (``_correct_sampling``,
    §6.5), from its own text templates, and the values they carry as printed."""
    goal = int(duration * rate)
    offset = duration - total / rate
    level = LogLevel.WARNING if abs(offset) > 0.02 else LogLevel.INFO
    seconds = int(duration) if rtc else 0
    to_ts = start_ts + duration
    lines = [
        _line(texts.NTP_SYNCED_LOG.format(conf=conf)),
        _line(texts.AFTER_NTP_RATE.format(rate=total / duration)),
        _line(texts.SHOULD_BE.format(goal=goal, total=total), level),
        _line(texts.OFFSET_OF.format(offset=offset, seconds=seconds, duration=duration), level),
        _line(texts.FROM_TS.format(ts=format_timestamp(start_ts))),
        _line(texts.TO_TS.format(ts=format_timestamp(to_ts))),
    ]
    correction = 0
    if abs(offset) >= 0.009:
        correction = max(-10, min(10, goal - total))
        lines.append(_line(texts.CORRECTING.format(n=correction), LogLevel.WARNING))
    expected = {
        "confidence_ms": conf,
        "avg_rate_hz": float(f"{total / duration:.3f}"),
        "goal_samples": goal,
        "total_samples": total,
        "offset_s": float(f"{offset:.3f}"),
        "second_interrupts": seconds,
        "sampling_duration_s": float(f"{duration:.3f}"),
        "from_ts": float(format_timestamp(start_ts)),
        "to_ts": float(format_timestamp(to_ts)),
        "correction": correction,
        "problems": (),
    }
    return lines, expected


def _fields(record: SyncRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in (
        "confidence_ms", "avg_rate_hz", "goal_samples", "total_samples", "offset_s",
        "second_interrupts", "sampling_duration_s", "from_ts", "to_ts", "correction", "problems",
    )}


UNRELATED = [
    _line(texts.CLIENT_CONNECTED.format(ip="10.0.0.7", port=40112)),
    _line(texts.TOO_MANY_CLIENTS, LogLevel.ERROR),
    _line("MISSED 2 SAMPLES", LogLevel.ERROR),
    _line(texts.LOG_LEVEL_SET.format(level="INFO")),
    _line(texts.STREAM_CANNOT.format(server="-"), LogLevel.WARNING),
]


def _assemble(lines: list[LogLine]) -> tuple[list[SyncRecord], SyncRecordAssembler]:
    assembler = SyncRecordAssembler()
    records = [r for r in map(assembler.feed, lines) if r is not None]
    return records, assembler


def _through_decoder(lines: list[LogLine], splits: list[int]) -> list[LogLine]:
    """The lines as bytes on the wire, decoded from chunks cut at ``splits``."""
    wire = b"".join(encode_log_line(x.level, x.device_time, x.text) for x in lines)
    decoder = StreamDecoder()
    out: list[LogLine] = []
    cuts = sorted({0, len(wire), *(s % (len(wire) + 1) for s in splits)})
    for a, b in zip(cuts, cuts[1:], strict=False):
        decoder.receive_data(wire[a:b])
        out.extend(e for e in decoder.events() if isinstance(e, LogLine))
    return out


records_while_sampling = st.builds(
    _record_lines,
    conf=st.integers(0, 199),
    rate=st.sampled_from([1, 10, 50, 1000, 4000, 8000]),
    total=st.integers(1, 10**7),
    duration=st.floats(0.5, 86_400.0),
    start_ts=st.floats(1_514_764_800.0, 2_000_000_000.0),
)


@given(record=records_while_sampling, data=st.data())
@settings(max_examples=200, deadline=None)
def test_assembler_reads_a_record_while_sampling_among_unrelated_lines(record, data):
    lines, expected = record
    stream = list(lines)
    for _ in range(data.draw(st.integers(0, 6))):  # unrelated lines anywhere, before To
        at = data.draw(st.integers(0, len(stream) - (2 if expected["correction"] else 1)))
        stream.insert(at, data.draw(st.sampled_from(UNRELATED)))
    if abs(expected["offset_s"]) == 0.009:  # printed at the threshold: the next second decides
        stream.append(_line(texts.RATE_LOG.format(rate=1000, total=1)))
    splits = data.draw(st.lists(st.integers(0, 10_000), max_size=20))
    decoded = _through_decoder(stream, splits)
    assert [x.text for x in decoded] == [x.text for x in stream]

    records, assembler = _assemble(decoded)
    assert len(records) == 1 and not assembler.pending  # complete without waiting
    assert _fields(records[0]) == expected
    assert records[0].during_sampling
    assert [x.text for x in records[0].lines] == [x.text for x in lines]


def test_idle_sync_is_one_conf_line_closed_by_lifeness_or_flush():
    conf = _line(texts.NTP_SYNCED_LOG.format(conf=4))
    lifeness = _line("")
    records, assembler = _assemble([conf, UNRELATED[0], lifeness])
    assert len(records) == 1 and not assembler.pending
    assert _fields(records[0]) == {
        "confidence_ms": 4, "avg_rate_hz": None, "goal_samples": None, "total_samples": None,
        "offset_s": None, "second_interrupts": None, "sampling_duration_s": None,
        "from_ts": None, "to_ts": None, "correction": 0, "problems": (),
    }
    assert not records[0].during_sampling

    # the ntp reply ends the lines before any lifeness line: flush gives the record
    records, assembler = _assemble([conf])
    assert records == [] and assembler.pending
    record = assembler.flush()
    assert record is not None and record.confidence_ms == 4 and record.problems == ()
    assert assembler.flush() is None


def test_two_idle_syncs_in_a_row_are_two_records():
    lines = [_line(texts.NTP_SYNCED_LOG.format(conf=c)) for c in (3, 9)]
    records, assembler = _assemble(lines)
    assert [r.confidence_ms for r in records] == [3]
    last = assembler.flush()
    assert last is not None and last.confidence_ms == 9


def test_a_failed_sync_writes_nothing_and_leaves_no_record():
    """§3.7/§6.4: firmware 2.2 logs no line when a sync fails; the assembler must neither
    invent a record nor let the failure disturb the next one."""
    lines, expected = _record_lines(5, 1000, 2000, 2.0, T0)
    failed_window = [_line(""), UNRELATED[0], _line("")]  # what an idle meter sends meanwhile
    records, assembler = _assemble(failed_window + lines)
    assert len(records) == 1 and _fields(records[0]) == expected


def test_printed_threshold_offset_waits_for_the_proof():
    """A printed 0.009 s offset may be just below or above 9 ms (3 decimals, §6.5)."""
    below, _ = _record_lines(2, 1000, 1991, 2.0, T0)  # 0.00899... s: no correction
    above, _ = _record_lines(2, 1000, 2000, 2.0092, T0)  # 0.0092 s: Correcting: 9 samples
    for lines in (below, above):
        assert lines[3].text.startswith("Offset of 0.009 s")
    assert len(below) == 6 and len(above) == 7
    records, assembler = _assemble(below)
    assert records == [] and assembler.pending
    next_second = _line(texts.RATE_LOG.format(rate=1000, total=3))
    records, _ = _assemble([*below, next_second])
    assert len(records) == 1 and records[0].correction == 0 and records[0].problems == ()
    records, _ = _assemble(above)
    assert len(records) == 1 and records[0].correction == 9 and records[0].problems == ()


def test_missing_and_stray_lines_are_reported_not_dropped():
    lines, expected = _record_lines(7, 8000, 8000 * 60 - 200, 60.0, T0)  # offset 0.025 s
    assert expected["correction"] == 10
    # Correcting line lost; the next second's rate line proves it is not coming
    records, _ = _assemble([*lines[:-1], _line(texts.RATE_LOG.format(rate=8000, total=61))])
    assert len(records) == 1 and records[0].correction == 0
    assert any("no 'Correcting:' line" in p for p in records[0].problems)
    # subscribed in the middle of a record: no conf line, still a record, flagged
    records, _ = _assemble(lines[2:])
    assert len(records) == 1 and records[0].confidence_ms is None
    assert records[0].offset_s == 0.025 and records[0].correction == 10
    assert any("no 'NTP synced with conf'" in p for p in records[0].problems)
    assert "missing lines: After NTP Sync" in records[0].problems
    # a new sync starts before the old record's To line: the old one is closed, flagged
    records, assembler = _assemble([*lines[:3], *lines])
    assert len(records) == 2
    assert any("missing lines" in p for p in records[0].problems)
    assert _fields(records[1]) == expected
    # the session started before the meter's first sync: From 0.000 (§6.1)
    zero_start, _ = _record_lines(7, 100, 100, 1.0, 0.0)
    records, _ = _assemble(zero_start)
    assert any("From 0.000" in p for p in records[0].problems)


# ------------------------------------------------------------------------------ live


class OffsetSntpResponder(asyncio.DatagramProtocol):
    """An SNTP server serving the host clock + ``offset_s`` (RFC 4330 reply)."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.time() + self.offset_s
        self.transport.sendto(server_reply(data, now, now), addr)


@pytest.fixture
async def offset_meter():
    loop = asyncio.get_running_loop()
    transport, responder = await loop.create_datagram_endpoint(
        OffsetSntpResponder, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    meter = EmulatedMeter(emulator_config(time_server="127.0.0.1", ntp_port=port))
    await meter.start()
    try:
        yield meter, responder
    finally:
        await meter.stop()
        transport.close()


async def test_live_rate_report_and_ntp_confidence(offset_meter):
    meter, _ = offset_meter
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        lines: list[LogLine] = []
        client.subscribe_logs(lines.append)
        session = await client.sample(rate=1000)
        await client.ntp_sync()  # allowed while sampling (§3.7)
        for _ in range(40):
            if any(rate_report(line) for line in lines):
                break
            await asyncio.sleep(0.05)
        await session.stop()
        reports = [r for r in map(rate_report, lines) if r]
        assert reports and 900 < reports[0].measured_rate < 1100
        confidences = [c for c in map(ntp_confidence_ms, lines) if c is not None]
        assert confidences and all(0 <= c < 200 for c in confidences)


async def test_live_sync_records_match_the_time_servers_step(offset_meter):
    """Idle sync, then a sync while sampling whose server jumped +50 ms: the record carries
    the meter's confidence, the +50 ms offset, the capped +10 correction and the session's
    start, all read from the meter's log text."""
    meter, responder = offset_meter
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        assembler = SyncRecordAssembler()
        records: list[SyncRecord] = []
        lines: list[LogLine] = []

        def take(line: LogLine) -> None:
            lines.append(line)
            record = assembler.feed(line)
            if record is not None:
                records.append(record)

        client.subscribe_logs(take)
        reply = await client.ntp_sync()
        assert reply.succeeded
        idle = assembler.flush()  # the firmware logs the record before the reply (§3.7)
        assert idle is not None and not idle.during_sampling and idle.problems == ()
        assert meter.last_sntp is not None and idle.confidence_ms == meter.last_sntp.confidence_ms

        session = await client.sample(rate=1000)
        start_ts = session.reply.start_ts
        await asyncio.sleep(0.6)
        responder.offset_s = 0.05
        sent = time.time()
        await client.ntp_sync()
        assert len(records) == 1 and not assembler.pending  # complete before the reply
        record = records[0]
        await session.stop()

    assert record.problems == () and record.during_sampling
    assert meter.last_sntp is not None and record.confidence_ms == meter.last_sntp.confidence_ms
    conf_s = record.confidence_ms / 1000
    assert record.offset_s is not None and abs(record.offset_s - 0.05) <= conf_s + 0.003
    assert record.correction == 10  # goal - total = ~50 samples, capped at 10 (§6.5)
    assert record.goal_samples is not None and record.total_samples is not None
    assert abs(record.goal_samples - record.total_samples - 50) <= 1000 * conf_s + 3
    assert record.to_ts is not None and abs(record.to_ts - (sent + 0.05)) < 0.1
    assert record.from_ts is not None and record.sampling_duration_s is not None
    assert abs(record.to_ts - record.from_ts - record.sampling_duration_s) <= 0.002
    assert record.from_ts == start_ts  # the sample reply's startTs (§4.4)
    assert [x.text for x in record.lines][0].startswith("NTP synced with conf: ")


async def test_live_failed_sync_leaves_no_record(make_dead_meter):
    meter = make_dead_meter
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        assembler = SyncRecordAssembler()
        fed: list[SyncRecord] = []
        client.subscribe_logs(lambda line: fed.extend(filter(None, [assembler.feed(line)])))
        with pytest.raises(MeterCommandRejected, match="Error syncing time"):
            await client.ntp_sync()
        assert fed == [] and assembler.flush() is None


@pytest.fixture
async def make_dead_meter():
    """A meter whose time server port answers nothing (ICMP port unreachable)."""
    probe = await asyncio.get_running_loop().create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    dead_port = probe[0].get_extra_info("sockname")[1]
    probe[0].close()
    meter = EmulatedMeter(emulator_config(time_server="127.0.0.1", ntp_port=dead_port))
    await meter.start()
    try:
        yield meter
    finally:
        await meter.stop()


def test_random_interleaving_is_deterministic():
    """Feeding the same lines twice gives the same records (no hidden state or clock)."""
    rng = random.Random(7)
    lines: list[LogLine] = []
    for i in range(20):
        block, _ = _record_lines(rng.randrange(200), 1000, 1000 * (i + 1) - i, i + 1.0, T0)
        lines += block + [rng.choice(UNRELATED)]
    first, _ = _assemble(lines)
    second, _ = _assemble(lines)
    assert first == second and len(first) == 20
