"""StreamDecoder, RawSampleDecoder and DatagramDecoder against streams built with the
encoders of ``_wire`` (one codec, two roles).  Every StreamDecoder case is decoded both
whole and byte by byte, and the two must agree (``decode_all_ways``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    CorruptFrame,
    DebugLine,
    LatePacket,
    LogLevel,
    LogLine,
    PacketGap,
    PlainLine,
    ProtocolError,
    RepairedFrame,
    Reply,
    Samples,
    SkippedBytes,
    UnparsedReply,
)
from smartmeter_ophyd.protocol._decoder import (
    DatagramDecoder,
    RawSampleDecoder,
    StreamDecoder,
    StreamSession,
)
from smartmeter_ophyd.protocol._events import Event
from smartmeter_ophyd.protocol._wire import (
    encode_frame,
    encode_frames,
    encode_log_line,
    encode_plain_line,
    encode_raw_info_line,
    encode_reply,
)


def feed(decoder: StreamDecoder, pieces: Iterable[bytes], *, eof: bool = True) -> list[Event]:
    """Feed ``pieces`` one after another, draining events after each; then EOF."""
    out: list[Event] = []
    for piece in pieces:
        decoder.receive_data(piece)
        out.extend(decoder.events())
    if eof:
        decoder.receive_data(b"")
        out.extend(decoder.events())
    return out


def merge_samples(events: Sequence[Event]) -> list[Event]:
    """Concatenate adjacent Samples: bulk decoding batches frames differently per split."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, Samples) and merged and isinstance(merged[-1], Samples):
            last = merged[-1]
            merged[-1] = Samples(
                np.concatenate([last.values, event.values]),
                np.concatenate([last.packets, event.packets]),
                np.concatenate([last.frame_samples, event.frame_samples]),
            )
        else:
            merged.append(event)
    return merged


def comparable(events: Sequence[Event]) -> list[Any]:
    """Events as plain values (arrays → bytes/lists) so sequences compare with ==."""
    out: list[Any] = []
    for event in merge_samples(events):
        if isinstance(event, Samples):
            out.append(
                (
                    "Samples",
                    event.values.dtype.str,
                    event.values.shape,
                    event.values.tobytes(),
                    event.packets.tolist(),
                    event.frame_samples.tolist(),
                )
            )
        elif isinstance(event, LatePacket):
            out.append(("LatePacket", event.packet, event.expected, event.values.tobytes()))
        else:
            out.append(event)
    return out


def decode_all_ways(
    stream: bytes, make: Callable[[], StreamDecoder] = StreamDecoder
) -> list[Event]:
    """Decode ``stream`` whole and byte by byte; assert both give the same events.

    Returns the (Samples-merged) events of the whole feed.
    """
    whole = feed(make(), [stream])
    bytewise = feed(make(), [stream[i : i + 1] for i in range(len(stream))])
    assert comparable(whole) == comparable(bytewise)
    return merge_samples(whole)


# ---------------------------------------------------------------------------- fixtures

SAMPLE_REPLY = encode_reply(
    {
        "error": False,
        "cmd": "sample",
        "measures": "v,i,v,i,v,i",
        "chunksize": 1008,
        "samplingrate": 4000,
        "conn_type": "TCP",
        "measurements": 6,
        "prefix": True,
        "flowCtr": False,
        "unit": "V,mA,V,mA,V,mA",
        "startTs": "1614677828.512",
    }
)
SPF = 42  # samples per 1008-byte frame with 6 channels
RNG = np.random.default_rng(1234)


def waveform(n_samples: int, channels: int = 6, seed: int = 0) -> np.ndarray:
    """Distinct, prefix-free sample values (small integers: no 'Data:'/'Info:' patterns)."""
    base = np.arange(n_samples * channels, dtype=np.float32).reshape(n_samples, channels)
    return (base + seed * 1000.0).astype(np.float32)


def frames(first: int, values: np.ndarray, spf: int = SPF, **kw: Any) -> bytes:
    return encode_frames(first, values, spf, **kw)


def samples_of(events: Sequence[Event]) -> list[Samples]:
    return [e for e in events if isinstance(e, Samples)]


def all_values(events: Sequence[Event]) -> np.ndarray:
    parts = [e.values for e in samples_of(events)]
    return np.concatenate(parts) if parts else np.empty((0, 6), np.float32)


def kinds(events: Sequence[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


# ----------------------------------------------------------------- verbatim text lines

APPENDIX_B_INFO = (
    b'Info:{"cmd":"info","type":"smartmeter","version":"2.2","compiled":"Nov  3 2021 18:09:15",'
    b'"sys_time":"03/02/2021 10:37:07.662","name":"smartmeterX","ip":"192.168.0.138",'
    b'"mqtt_server":"-","stream_server":"-","time_server":"time.google.com","sampling_rate":8000,'
    b'"buffer_size":3670016,"psram":true,"rtc":true,"state":"idle",'
    b'"energy":"[0.0000, 0.0000, 0.0000]","dailyReset":"None","calibration":[1,1,1,1,1,1],'
    b'"ssids":"[]"}\r\n'
)
APPENDIX_B_SAMPLE = (
    b'Info:{"error":false,"cmd":"sample","measures":"v,i,v,i,v,i","chunksize":1008,'
    b'"samplingrate":4000,"conn_type":"TCP","measurements":6,"prefix":true,"flowCtr":false,'
    b'"unit":"V,mA,V,mA,V,mA","startTs":"1614677828.512"}\r\n'
)
APPENDIX_B_STOP = (
    b'Info:{"msg":"Received stop command","sample_duration":2043,"samples":8172,'
    b'"sent_samples":8172,"start_ts":"1614677828.512","stop_ts":"1614677830.555",'
    b'"ip":"192.168.0.138","avg_rate":4000,"cmd":"stop","error":false}\r\n'
)
LIFENESS = b"Info:[I]03/02 10:37:08: \r\n"
RATE_LOG = b"Info:[I]03/02 10:37:09: 3999.98Hz, 4000s\r\n"
GETLOG_FIRST = (
    b'Info:{"cmd":"log","msg":"*** LOGFile *** //nInfo:[W]03/02 11:26:20: "quoted" //n'
    b'03/02 11:30:00: Reboot - inited SPIFFS Logger//n*** LOGFile *** "}\r\n'
)


def test_appendix_b_session_verbatim() -> None:
    values = waveform(2 * SPF + 10)
    stream = (
        APPENDIX_B_INFO
        + LIFENESS
        + APPENDIX_B_SAMPLE
        + frames(0, values[:SPF])
        + RATE_LOG
        + frames(1, values[SPF : 2 * SPF])
        + encode_frame(2, values[2 * SPF :].astype("<f4").tobytes())  # short tail frame
        + APPENDIX_B_STOP
    )
    events = decode_all_ways(stream)
    assert kinds(events) == [
        "Reply", "LogLine", "Reply", "Samples", "LogLine", "Samples", "Reply", "ConnectionClosed",
    ]  # fmt: skip
    info = events[0]
    assert isinstance(info, Reply) and info.cmd == "info"
    assert list(info.fields)[:4] == ["cmd", "type", "version", "compiled"]  # key order kept
    assert info.fields["compiled"] == "Nov  3 2021 18:09:15"
    assert events[1] == LogLine(LogLevel.INFO, "03/02 10:37:08", "")
    assert events[4] == LogLine(LogLevel.INFO, "03/02 10:37:09", "3999.98Hz, 4000s")
    tail = events[5]
    assert isinstance(tail, Samples)
    assert tail.packets.tolist() == [1, 2] and tail.frame_samples.tolist() == [SPF, 10]
    np.testing.assert_array_equal(all_values(events), values)
    assert all_values(events).dtype == np.float32
    stop = events[6]
    assert isinstance(stop, Reply) and list(stop.fields)[-2:] == ["cmd", "error"]
    assert events[7] == ConnectionClosed(0)


def test_session_tracking_from_replies() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(APPENDIX_B_SAMPLE)
    decoder.events()
    assert decoder.session == StreamSession(6, 1008, True)
    assert decoder.session.chunk_samples == SPF
    decoder.receive_data(APPENDIX_B_STOP)
    decoder.events()
    assert decoder.session is None


def test_rejected_sample_reply_starts_no_session() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(encode_reply({"error": True, "cmd": "sample", "msg": "busy"}))
    assert isinstance(decoder.events()[0], Reply)
    assert decoder.session is None


def test_text_line_classification() -> None:
    stream = (
        GETLOG_FIRST
        + encode_plain_line("Setup done")
        + encode_log_line(LogLevel.ERROR, "03/02 11:26:20", "deserializeJson() failed: x")
        + b'Info:[I]03/02 10:42:24: {"cmd":"mqtt"}\r\n'
        + encode_raw_info_line("{not json")
        + encode_reply({"b": 1, "a": 2})
    )
    events = decode_all_ways(stream)
    assert events[0] == UnparsedReply(GETLOG_FIRST[5:-2].decode())
    assert events[1] == PlainLine("Setup done")
    assert events[2] == LogLine(LogLevel.ERROR, "03/02 11:26:20", "deserializeJson() failed: x")
    assert events[3] == LogLine(LogLevel.INFO, "03/02 10:42:24", '{"cmd":"mqtt"}')
    assert events[4] == UnparsedReply("{not json")
    assert isinstance(events[5], Reply) and list(events[5].fields) == ["b", "a"]


# ------------------------------------------------------------------------------ frames


def test_steady_stream_decodes_in_one_samples_event() -> None:
    values = waveform(200 * SPF)
    decoder = StreamDecoder()
    decoder.receive_data(SAMPLE_REPLY + frames(0, values) + RATE_LOG)
    events = decoder.events()
    assert kinds(events) == ["Reply", "Samples", "LogLine"]
    samples = events[1]
    assert isinstance(samples, Samples)
    assert samples.values.shape == (200 * SPF, 6)
    assert samples.packets.tolist() == list(range(200))
    assert samples.frame_samples.tolist() == [SPF] * 200
    np.testing.assert_array_equal(samples.values, values)


def test_last_frame_waits_for_the_next_prefix_and_release_pending() -> None:
    values = waveform(3 * SPF)
    decoder = StreamDecoder()
    decoder.receive_data(SAMPLE_REPLY + frames(0, values))
    events = decoder.events()
    assert samples_of(events)[0].packets.tolist() == [0, 1]  # frame 2 is unverified
    assert decoder.next_event() is NEED_DATA
    released = decoder.release_pending()
    assert kinds(released) == ["Samples"]
    np.testing.assert_array_equal(released[0].values, values[2 * SPF :])
    assert decoder.release_pending() == []


def test_gap_is_reported_before_samples() -> None:
    values = waveform(5 * SPF)
    stream = SAMPLE_REPLY + frames(0, values[: 2 * SPF]) + frames(4, values[4 * SPF :])
    events = decode_all_ways(stream)
    assert kinds(events) == ["Reply", "Samples", "PacketGap", "Samples", "ConnectionClosed"]
    assert events[2] == PacketGap(expected=2, received=4, missing_samples=2 * SPF)
    assert events[2].missing_packets == 2
    assert events[3].packets.tolist() == [4]


def test_gap_without_known_chunk_size() -> None:
    values = waveform(3 * SPF)
    stream = frames(1, values[SPF : 2 * SPF]) + RATE_LOG  # outside a session, starts at 1
    events = decode_all_ways(stream)
    assert events[0] == PacketGap(expected=0, received=1, missing_samples=None)


def test_late_packet_is_not_placed_in_the_stream() -> None:
    values = waveform(4 * SPF)
    stream = (
        SAMPLE_REPLY
        + frames(0, values[: 3 * SPF])
        + frames(1, values[SPF : 2 * SPF])  # duplicate of packet 1
        + frames(3, values[3 * SPF :])
        + RATE_LOG
    )
    events = decode_all_ways(stream)
    assert kinds(events) == [
        "Reply",
        "Samples",
        "LatePacket",
        "Samples",
        "LogLine",
        "ConnectionClosed",
    ]
    late = events[2]
    assert isinstance(late, LatePacket) and (late.packet, late.expected) == (1, 3)
    np.testing.assert_array_equal(late.values, values[SPF : 2 * SPF])
    assert events[3].packets.tolist() == [3]
    np.testing.assert_array_equal(
        all_values(events), np.concatenate([values[: 3 * SPF], values[3 * SPF :]])
    )


def test_garbage_before_and_between_frames_is_one_skip_per_run() -> None:
    values = waveform(4 * SPF)
    junk1 = b"\x00\x01garbage-before" * 10
    junk2 = b"xx\r\nDat\x00noise"
    stream = (
        junk1
        + SAMPLE_REPLY
        + frames(0, values[: 2 * SPF])
        + RATE_LOG
        + junk2
        + frames(2, values[2 * SPF :])
    )
    # (garbage right after a *frame* makes that frame's extent doubtful: see the corrupt tests)
    events = decode_all_ways(stream)
    assert kinds(events) == [
        "SkippedBytes", "Reply", "Samples", "LogLine", "SkippedBytes", "Samples", "ConnectionClosed",
    ]  # fmt: skip
    assert events[0] == SkippedBytes(len(junk1), junk1[:64], events[0].reason)
    assert events[4].count == len(junk2) and events[4].head == junk2
    np.testing.assert_array_equal(all_values(events), values)


def test_log_line_inside_a_frame_is_cut_out() -> None:
    values = waveform(3 * SPF)
    frame1 = frames(1, values[SPF : 2 * SPF])
    log = encode_log_line(LogLevel.WARNING, "03/02 10:42:24", "NTP sync took 12ms")
    cut = 11 + 500
    stream = (
        SAMPLE_REPLY
        + frames(0, values[:SPF])
        + frame1[:cut]
        + log
        + frame1[cut:]
        + frames(2, values[2 * SPF :])
        + RATE_LOG
    )
    events = decode_all_ways(stream)
    assert kinds(events) == [
        "Reply", "Samples", "RepairedFrame", "Samples", "LogLine", "Samples", "LogLine",
        "ConnectionClosed",
    ]  # fmt: skip
    assert events[2] == RepairedFrame(packet=1, removed_bytes=len(log))
    assert events[4] == LogLine(LogLevel.WARNING, "03/02 10:42:24", "NTP sync took 12ms")
    np.testing.assert_array_equal(all_values(events), values)


def test_log_line_overhanging_the_declared_frame_end_is_cut_out() -> None:
    values = waveform(2 * SPF)
    frame0 = frames(0, values[:SPF])
    log = encode_log_line(LogLevel.INFO, "03/02 10:42:24", "x" * 100)
    cut = len(frame0) - 20  # the log line extends past the declared payload end
    stream = SAMPLE_REPLY + frame0[:cut] + log + frame0[cut:] + frames(1, values[SPF:]) + RATE_LOG
    events = decode_all_ways(stream)
    assert kinds(events)[:4] == ["Reply", "RepairedFrame", "Samples", "LogLine"]
    np.testing.assert_array_equal(all_values(events), values)


def test_garbage_inside_a_frame_corrupts_it_and_its_samples_are_not_delivered() -> None:
    values = waveform(3 * SPF)
    frame1 = frames(1, values[SPF : 2 * SPF])
    junk = b"\x07\x07\x07"
    stream = (
        SAMPLE_REPLY
        + frames(0, values[:SPF])
        + frame1[:300]
        + junk
        + frame1[300:]
        + frames(2, values[2 * SPF :])
        + RATE_LOG
    )
    events = decode_all_ways(stream)
    assert kinds(events) == [
        "Reply", "Samples", "CorruptFrame", "SkippedBytes", "Samples", "LogLine", "ConnectionClosed",
    ]  # fmt: skip
    corrupt = events[2]
    assert isinstance(corrupt, CorruptFrame) and corrupt.packet == 1
    assert corrupt.missing_samples(24) == SPF
    assert events[3].count == len(frame1) + len(junk)
    assert events[3].head == frame1[:64]
    assert events[4].packets.tolist() == [2]  # no PacketGap: packet 1 was declared corrupt
    delivered = all_values(events)
    np.testing.assert_array_equal(delivered, np.concatenate([values[:SPF], values[2 * SPF :]]))


@pytest.mark.parametrize(
    "length",
    [0, 0xFFFF, 1000, 1009],  # zero, > max_payload, not a multiple of 24 bytes
)
def test_hostile_length_fields_are_garbage(length: int) -> None:
    values = waveform(2 * SPF)
    hostile = b"Data:" + length.to_bytes(2, "little") + b"\x05\x00\x00\x00" + b"\x01" * 40
    stream = SAMPLE_REPLY + hostile + frames(0, values)
    events = decode_all_ways(stream)
    assert kinds(events) == ["Reply", "SkippedBytes", "Samples", "ConnectionClosed"]
    assert events[1].count == len(hostile)
    assert "length" in events[1].reason
    np.testing.assert_array_equal(all_values(events), values)


def test_hostile_length_keeps_memory_bounded() -> None:
    decoder = StreamDecoder(max_payload_bytes=2000)
    decoder.receive_data(b"Data:\xff\xff\x00\x00\x00\x00")
    for _ in range(100):
        decoder.receive_data(b"\x00" * 1000)
        assert all(isinstance(e, SkippedBytes) for e in decoder.events())
        assert decoder.buffered_bytes <= 8


def test_endless_line_is_skipped_and_decoding_resumes() -> None:
    def make() -> StreamDecoder:
        return StreamDecoder(max_line_bytes=256)

    endless = b"Info:" + b"a" * 5000
    stream = endless + LIFENESS + encode_plain_line("after")
    events = decode_all_ways(stream, make)
    assert kinds(events) == ["SkippedBytes", "LogLine", "PlainLine", "ConnectionClosed"]
    assert events[0].count == len(endless) and "longer than 256" in events[0].reason

    decoder = make()
    for _ in range(50):
        decoder.receive_data(b"b" * 100)
        decoder.events()
        assert decoder.buffered_bytes <= decoder.max_buffered_bytes


def test_partial_prefix_waits() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(b"Inf")
    assert decoder.events() == []
    decoder.receive_data(b"o:Setup done\r\n")
    assert decoder.events() == [PlainLine("Setup done")]


# ------------------------------------------------------------------------------- EOF


def test_eof_inside_a_frame() -> None:
    values = waveform(2 * SPF)
    stream = SAMPLE_REPLY + frames(0, values)
    truncated = stream[:-100]
    events = decode_all_ways(truncated)
    assert kinds(events) == ["Reply", "Samples", "CorruptFrame", "SkippedBytes", "ConnectionClosed"]
    assert events[2].packet == 1
    skipped = len(frames(1, values[SPF:])) - 100
    assert events[3].count == skipped
    assert events[4] == ConnectionClosed(skipped)


def test_eof_after_a_complete_frame_accepts_it() -> None:
    values = waveform(SPF)
    events = decode_all_ways(SAMPLE_REPLY + frames(0, values))
    assert kinds(events) == ["Reply", "Samples", "ConnectionClosed"]


def test_eof_inside_a_line() -> None:
    events = decode_all_ways(LIFENESS + b"Info:[I]03/02 10")
    assert kinds(events) == ["LogLine", "SkippedBytes", "ConnectionClosed"]
    assert events[1].count == 16 and events[2] == ConnectionClosed(16)


def test_data_after_eof_is_an_error() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"x")


# ---------------------------------------------------------------------- explicit session


def test_start_session_sets_the_frame_format() -> None:
    values = waveform(3 * 16, channels=2)

    def make() -> StreamDecoder:
        decoder = StreamDecoder()
        decoder.start_session(values_per_sample=2, chunk_bytes=128)
        return decoder

    stream = frames(0, values[:16], 16) + frames(2, values[32:], 16)
    events = decode_all_ways(stream, make)
    assert kinds(events) == ["Samples", "PacketGap", "Samples", "ConnectionClosed"]
    assert events[1] == PacketGap(1, 2, 16)
    assert events[2].values.shape == (16, 2)


# ---------------------------------------------------------------------------- serial


def test_serial_frames_with_crlf_and_debug_lines() -> None:
    serial_reply = encode_reply(
        {"error": False, "cmd": "sample", "chunksize": 120, "measurements": 6, "prefix": True}
    )
    values = waveform(4 * 5)
    stream = (
        serial_reply
        + frames(0, values[:10], 5, serial=True)
        + b"Sending... "
        + frames(2, values[10:15], 5, serial=True)
        + b"Took 3ms\r\n"
        + b"Info:[WiFi-event] event: 5\n"
        + frames(3, values[15:], 5, serial=True)
        + encode_log_line(LogLevel.ALL, "03/02 10:00:00", "Setup done")
    )
    events = decode_all_ways(stream, lambda: StreamDecoder(serial=True))
    assert kinds(events) == [
        "Reply", "Samples", "DebugLine", "Samples", "DebugLine", "PlainLine", "Samples",
        "LogLine", "ConnectionClosed",
    ]  # fmt: skip
    assert events[2] == DebugLine("Sending... ")
    assert events[4] == DebugLine("Took 3ms")
    assert events[5] == PlainLine("[WiFi-event] event: 5")
    np.testing.assert_array_equal(all_values(events), values)


def test_serial_frame_without_crlf_is_corrupt() -> None:
    values = waveform(15)
    bad = frames(1, values[5:10], 5)  # TCP framing on a serial stream: no CRLF
    stream = frames(0, values[:5], 5, serial=True) + bad + frames(2, values[10:], 5, serial=True)
    events = decode_all_ways(stream, lambda: StreamDecoder(serial=True))
    assert kinds(events) == [
        "Samples",
        "CorruptFrame",
        "SkippedBytes",
        "Samples",
        "ConnectionClosed",
    ]
    assert events[1].packet == 1 and events[3].packets.tolist() == [2]


def test_serial_log_line_inside_frame_is_cut_out() -> None:
    values = waveform(10)
    frame = frames(0, values[:5], 5, serial=True)
    log = encode_log_line(LogLevel.ALL, "03/02 10:00:00", "MESSAGE Over Serial")
    stream = frame[:40] + log + frame[40:] + frames(1, values[5:], 5, serial=True)
    events = decode_all_ways(stream, lambda: StreamDecoder(serial=True))
    assert kinds(events) == ["RepairedFrame", "Samples", "LogLine", "Samples", "ConnectionClosed"]
    np.testing.assert_array_equal(all_values(events), values)


# ---------------------------------------------------------------------- raw samples


def test_raw_decoder_keeps_partial_samples() -> None:
    values = waveform(50)
    data = values.astype("<f4").tobytes()
    decoder = RawSampleDecoder(6)
    out: list[Event] = []
    for start in range(0, len(data), 7):
        decoder.receive_data(data[start : start + 7])
        out.extend(decoder.events())
        assert decoder.buffered_bytes < 24
    decoder.receive_data(b"")
    out.extend(decoder.events())
    assert kinds(out)[-1] == "ConnectionClosed" and out[-1] == ConnectionClosed(0)
    got = all_values(out)
    np.testing.assert_array_equal(got, values)
    assert all(e.packets.size == 0 for e in samples_of(out))


def test_raw_decoder_partial_sample_at_eof() -> None:
    decoder = RawSampleDecoder(2)
    decoder.receive_data(np.arange(5, dtype="<f4").tobytes())
    first = decoder.events()
    assert first[0].values.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    decoder.receive_data(b"")
    tail = decoder.events()
    assert kinds(tail) == ["SkippedBytes", "ConnectionClosed"]
    assert tail[0].count == 4 and tail[1] == ConnectionClosed(4)
    assert decoder.next_event() is NEED_DATA


# -------------------------------------------------------------------------- datagrams


def datagram(packet: int, values: np.ndarray) -> bytes:
    return encode_frame(packet, values.astype("<f4").tobytes())


def test_datagram_decoder_gap_late_and_invalid() -> None:
    values = waveform(4 * 21)
    decoder = DatagramDecoder(6, chunk_bytes=504)
    chunks = [values[i * 21 : (i + 1) * 21] for i in range(4)]
    assert kinds(decoder.receive_datagram(datagram(0, chunks[0]))) == ["Samples"]
    gap_events = decoder.receive_datagram(datagram(2, chunks[2]))
    assert gap_events[0] == PacketGap(1, 2, 21)
    np.testing.assert_array_equal(gap_events[1].values, chunks[2])
    late = decoder.receive_datagram(datagram(1, chunks[1]))
    assert isinstance(late[0], LatePacket) and late[0].expected == 3
    np.testing.assert_array_equal(late[0].values, chunks[1])
    truncated = datagram(3, chunks[3])[:-5]
    invalid = decoder.receive_datagram(truncated)
    assert kinds(invalid) == ["SkippedBytes"] and invalid[0].count == len(truncated)
    assert kinds(decoder.receive_datagram(b"Info:hello")) == ["SkippedBytes"]
    assert decoder.receive_datagram(datagram(3, chunks[3]))[0].packets.tolist() == [3]


def test_datagram_decoder_without_prefix() -> None:
    decoder = DatagramDecoder(6, prefix=False)
    values = waveform(21)
    events = decoder.receive_datagram(values.astype("<f4").tobytes())
    np.testing.assert_array_equal(events[0].values, values)
    assert kinds(decoder.receive_datagram(b"\x00" * 10)) == ["SkippedBytes"]
