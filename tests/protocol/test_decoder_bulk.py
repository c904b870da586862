"""StreamDecoder's fast paths: bulk runs (vectorised header and numbering checks) and
in-place decoding of the caller's chunks (frames and lines straddling chunks, chunks fed
without draining, EOF with undrained chunks, no view of the caller's bytes escaping)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from smartmeter_ophyd.protocol import (
    LatePacket,
    PacketGap,
    Samples,
)
from smartmeter_ophyd.protocol._decoder import StreamDecoder

from .test_decoder import (
    RATE_LOG,
    SAMPLE_REPLY,
    SPF,
    all_values,
    comparable,
    decode_all_ways,
    feed,
    frames,
    kinds,
    samples_of,
    waveform,
)


def _frames_numbered(numbers: list[int], values: np.ndarray, **kw: object) -> bytes:
    return b"".join(
        frames(number, values[i * SPF : (i + 1) * SPF], **kw)  # type: ignore[arg-type]
        for i, number in enumerate(numbers)
    )


@pytest.mark.parametrize("serial", [False, True])
def test_packet_numbers_wrap_inside_a_bulk_run(serial: bool) -> None:
    first = 2**32 - 3
    values = waveform(6 * SPF)

    def make() -> StreamDecoder:
        decoder = StreamDecoder(serial=serial)
        decoder.start_session(6, 1008)
        decoder.sequencer.expected = first
        return decoder

    stream = frames(first, values, serial=serial) + RATE_LOG
    events = decode_all_ways(stream, make)
    assert kinds(events) == ["Samples", "LogLine", "ConnectionClosed"]
    assert events[0].packets.tolist() == [first, first + 1, first + 2, 0, 1, 2]
    np.testing.assert_array_equal(events[0].values, values)
    whole = make()
    whole.receive_data(stream)
    assert kinds(whole.events()) == ["Samples", "LogLine"]  # one run across the wrap


@pytest.mark.parametrize("first", [250, 0xFFF0, 0xFFFFF0, 2**32 - 5, 0x1234_56F8])
def test_carries_between_packet_number_bytes_keep_one_run(first: int) -> None:
    """The byte-column scan of a run: a carry out of the low byte (into one, two or all
    three higher bytes, and the 2**32 wrap) inside a run is still consecutive."""
    n = 12
    numbers = [(first + i) % 2**32 for i in range(n)]
    values = waveform(n * SPF)
    decoder = StreamDecoder()
    decoder.start_session(6, 1008)
    decoder.sequencer.expected = first
    decoder.receive_data(_frames_numbered(numbers, values) + RATE_LOG)
    events = decoder.events()
    assert kinds(events) == ["Samples", "LogLine"]
    assert events[0].packets.tolist() == numbers
    np.testing.assert_array_equal(events[0].values, values)


@pytest.mark.parametrize("byte", [1, 2, 3])
def test_a_wrong_high_packet_byte_inside_a_run_is_a_gap(byte: int) -> None:
    """A frame whose number differs from the next one only in a higher byte (the low
    byte still counts up) is not taken for part of the run."""
    numbers = list(range(100, 110))
    numbers[6] += 1 << (8 * byte)
    values = waveform(len(numbers) * SPF)
    decoder = StreamDecoder()
    decoder.start_session(6, 1008)
    decoder.sequencer.expected = 100
    decoder.receive_data(_frames_numbered(numbers, values) + RATE_LOG)
    events = decoder.events()
    assert kinds(events)[:3] == ["Samples", "PacketGap", "Samples"]
    assert events[0].packets.tolist() == list(range(100, 106))
    assert events[1] == PacketGap(
        expected=106, received=numbers[6], missing_samples=(numbers[6] - 106) * SPF
    )


def test_swapped_packets_are_not_taken_for_a_consecutive_run() -> None:
    # first-to-last difference is n-1 although the numbers are not consecutive
    values = waveform(4 * SPF)
    stream = SAMPLE_REPLY + _frames_numbered([0, 2, 1, 3], values) + RATE_LOG
    events = decode_all_ways(stream)
    assert kinds(events) == [
        "Reply",
        "Samples",
        "PacketGap",
        "Samples",
        "LatePacket",
        "Samples",
        "LogLine",
        "ConnectionClosed",
    ]
    assert [e.packets.tolist() for e in samples_of(events)] == [[0], [2], [3]]
    assert events[2] == PacketGap(expected=1, received=2, missing_samples=SPF)
    late = events[4]
    assert isinstance(late, LatePacket) and (late.packet, late.expected) == (1, 3)
    np.testing.assert_array_equal(late.values, values[2 * SPF : 3 * SPF])


def test_a_jump_inside_a_long_run_splits_it_at_the_gap() -> None:
    numbers = [*range(0, 50), *range(52, 100)]
    values = waveform(len(numbers) * SPF)
    stream = SAMPLE_REPLY + _frames_numbered(numbers, values) + RATE_LOG
    decoder = StreamDecoder()
    decoder.receive_data(stream)
    events = decoder.events()
    assert kinds(events) == ["Reply", "Samples", "PacketGap", "Samples", "LogLine"]
    assert events[1].packets.tolist() == list(range(50))
    assert events[2] == PacketGap(expected=50, received=52, missing_samples=2 * SPF)
    assert events[3].packets.tolist() == list(range(52, 100))
    np.testing.assert_array_equal(all_values(events), values)


def test_a_frame_of_another_length_ends_a_bulk_run() -> None:
    values = waveform(5 * SPF + 16)
    stream = (
        SAMPLE_REPLY
        + frames(0, values[: 3 * SPF])
        + frames(3, values[3 * SPF : 3 * SPF + 16], 16)
        + frames(4, values[3 * SPF + 16 :])
        + RATE_LOG
    )
    events = decode_all_ways(stream)
    (samples,) = samples_of(events)  # adjacent Samples merged by decode_all_ways
    assert samples.packets.tolist() == [0, 1, 2, 3, 4, 5]
    assert samples.frame_samples.tolist() == [SPF, SPF, SPF, 16, SPF, SPF]
    np.testing.assert_array_equal(samples.values, values)


def _session(n_frames: int, log_every: int = 7) -> tuple[bytes, np.ndarray]:
    values = waveform(n_frames * SPF)
    parts = [SAMPLE_REPLY]
    for i in range(n_frames):
        parts.append(frames(i, values[i * SPF : (i + 1) * SPF]))
        if i % log_every == log_every - 1:
            parts.append(RATE_LOG)
    parts.append(RATE_LOG)
    return b"".join(parts), values


def _cut(stream: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at, i = [], 0, 0
    while at < len(stream):
        size = sizes[i % len(sizes)]
        pieces.append(stream[at : at + size])
        at += size
        i += 1
    return pieces


@pytest.mark.parametrize("sizes", [[1000], [1019], [7, 3000, 1], [5, 1014], [65536], [2, 2, 2039]])
def test_frames_straddling_chunks_decode_like_the_whole_stream(sizes: list[int]) -> None:
    stream, values = _session(40)
    pieces = _cut(stream, sizes)
    events = feed(StreamDecoder(), pieces)
    assert comparable(events) == comparable(feed(StreamDecoder(), [stream]))
    np.testing.assert_array_equal(all_values(events), values)


@pytest.mark.parametrize("drain_every", [1, 3, 1000])
def test_chunks_fed_without_draining_decode_like_the_whole_stream(drain_every: int) -> None:
    stream, values = _session(30)
    decoder = StreamDecoder()
    events = []
    for i, piece in enumerate(_cut(stream, [700, 1500, 13])):
        decoder.receive_data(piece)
        if i % drain_every == 0:
            events.extend(decoder.events())
    events.extend(decoder.events())
    assert decoder.buffered_bytes == 0
    decoder.receive_data(b"")
    events.extend(decoder.events())
    assert comparable(events) == comparable(feed(StreamDecoder(), [stream]))
    np.testing.assert_array_equal(all_values(events), values)


def test_eof_with_undrained_chunks_decides_on_all_bytes() -> None:
    stream, _ = _session(12)
    stream = stream[:-100] + b"\x00junk"  # ends inside a frame, then garbage
    split = _cut(stream, [999, 2000])
    decoder = StreamDecoder()
    for piece in split:
        decoder.receive_data(piece)
    assert decoder.buffered_bytes == len(stream)
    decoder.receive_data(b"")
    reference = StreamDecoder()
    reference.receive_data(stream)
    reference.receive_data(b"")
    assert comparable(decoder.events()) == comparable(reference.events())


def test_release_pending_waits_for_undrained_chunks() -> None:
    values = waveform(3 * SPF)
    stream = SAMPLE_REPLY + frames(0, values)
    decoder = StreamDecoder()
    decoder.receive_data(stream[:500])
    decoder.receive_data(stream[500:1800])  # frame 1 is proven only by bytes in here
    decoder.receive_data(stream[1800:])
    delivered = decoder.events()  # all chunks are looked at; frame 2 is still unproven
    assert sum((e.packets.tolist() for e in samples_of(delivered)), []) == [0, 1]
    released = decoder.release_pending()
    assert [e.packets.tolist() for e in samples_of(released)] == [[2]]
    np.testing.assert_array_equal(all_values(delivered + released), values)
    assert decoder.buffered_bytes == 0


def test_samples_never_share_memory_with_the_callers_chunks() -> None:
    stream, _ = _session(60)
    pieces = _cut(stream, [4096, 333])
    events = feed(StreamDecoder(), pieces)
    arrays = [e.values for e in events if isinstance(e, (Samples, LatePacket))]
    arrays += [a for e in samples_of(events) for a in (e.packets, e.frame_samples)]
    for array in arrays:
        assert array.flags.writeable
        for piece in pieces:
            assert not np.shares_memory(array, np.frombuffer(piece, np.uint8))


def test_the_decoder_keeps_no_reference_to_a_drained_chunk() -> None:
    stream, _ = _session(20)
    piece = stream[:5000]  # ends inside a frame: a tail must be kept, as a copy
    references = sys.getrefcount(piece)
    decoder = StreamDecoder()
    decoder.receive_data(piece)
    decoder.events()
    assert 0 < decoder.buffered_bytes <= decoder.max_buffered_bytes
    assert sys.getrefcount(piece) == references


def test_a_mutable_buffer_may_be_reused_after_receive_data() -> None:
    stream, values = _session(10)
    decoder = StreamDecoder()
    scratch = bytearray(len(stream))
    scratch[:] = stream
    decoder.receive_data(scratch)  # e.g. a recv_into buffer
    scratch[:] = bytes(len(stream))
    decoder.receive_data(b"")
    np.testing.assert_array_equal(all_values(decoder.events()), values)


def test_release_pending_never_releases_a_frame_that_later_chunks_repair() -> None:
    values = waveform(2 * SPF)
    second = frames(1, values[SPF:])
    damaged = second[:300] + RATE_LOG + second[300:]  # a log line written inside the frame
    stream = SAMPLE_REPLY + frames(0, values[:SPF]) + damaged + RATE_LOG
    declared_end = len(SAMPLE_REPLY) + 1019 + 1019  # where frame 1's length field points
    decoder = StreamDecoder()
    decoder.receive_data(stream[:declared_end])
    decoder.receive_data(stream[declared_end:])
    events = decoder.release_pending()
    assert "RepairedFrame" in kinds(events)
    np.testing.assert_array_equal(all_values(events), values)


@pytest.mark.parametrize("as_view", [False, True])
@pytest.mark.parametrize("read_bytes", [5 * 1019 + 37, 16 * 1024, 64 * 1024 + 3])
def test_steady_reads_each_yield_exactly_one_samples_event(read_bytes: int, as_view: bool) -> None:
    """The frame held back for its successor's prefix is joined with the next read and
    decoded in the same bulk run: one Samples event per read once warm, not two."""
    n_frames = 40 * read_bytes // 1019
    values = waveform(n_frames * SPF)
    stream = SAMPLE_REPLY + frames(0, values)
    pieces = _cut(stream, [read_bytes])
    decoder = StreamDecoder()
    scratch = bytearray(read_bytes)  # one receive buffer reused for every read, as a client does
    per_read: list[int] = []
    delivered = []
    for piece in pieces:
        if as_view:
            scratch[: len(piece)] = piece
            decoder.receive_data(memoryview(scratch)[: len(piece)])
            scratch[:] = bytes(read_bytes)  # the next read overwrites the buffer
        else:
            decoder.receive_data(piece)
        events = decoder.events()
        per_read.append(sum(isinstance(e, Samples) for e in events))
        delivered.extend(events)
        assert decoder.buffered_bytes <= decoder.max_buffered_bytes
    delivered.extend(decoder.release_pending())
    assert per_read[1:-1] == [1] * (len(pieces) - 2)  # the first read carries the reply
    np.testing.assert_array_equal(all_values(delivered), values)
    assert sum((e.packets.tolist() for e in samples_of(delivered)), []) == list(range(n_frames))


def test_a_chunk_smaller_than_the_tail_is_appended_not_rejoined() -> None:
    """Byte-wise feeding behind a held frame: the decoder appends to its own tail (no
    reference to the caller's bytes kept) and still decodes like the whole stream."""
    stream, values = _session(6)
    decoder = StreamDecoder()
    events = feed(decoder, [stream[:2100]], eof=False)
    small = [stream[i : i + 3] for i in range(2100, len(stream), 3)]
    references = [sys.getrefcount(piece) for piece in small]
    events += feed(decoder, small)
    assert [sys.getrefcount(piece) for piece in small] == references
    assert comparable(events) == comparable(feed(StreamDecoder(), [stream]))
    np.testing.assert_array_equal(all_values(events), values)
