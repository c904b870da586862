"""Property tests of StreamDecoder: split invariance, robustness against arbitrary bytes,
and sample accounting (delivered + declared missing = encoded)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmeter_ophyd.protocol import (
    CorruptFrame,
    LatePacket,
    LogLevel,
    PacketGap,
    ProtocolError,
    Samples,
    encode_frames,
    encode_log_line,
)
from smartmeter_ophyd.protocol._decoder import StreamDecoder

from .test_decoder import SAMPLE_REPLY, comparable, feed, waveform

SPF = 5
CHUNK = SPF * 24
REPLY = SAMPLE_REPLY.replace(b'"chunksize":1008', f'"chunksize":{CHUNK}'.encode())
LOG = encode_log_line(LogLevel.INFO, "03/02 10:42:24", "7999.87Hz, 80000s")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def session_streams(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    """A session with dropped frames, log lines between and inside frames, garbage after
    lines and bytes inserted inside frames.  Returns (stream, encoded samples, cut points)."""
    n_frames = draw(st.integers(1, 25))
    values = waveform(n_frames * SPF)
    parts = [REPLY]
    encoded = 0
    dropped = 0  # drops after the last delivered frame are undetectable: not counted
    for i in range(n_frames):
        frame = encode_frames(i, values[i * SPF : (i + 1) * SPF], SPF)
        action = draw(st.sampled_from(["keep"] * 6 + ["drop", "log", "log_inside", "junk_inside"]))
        if action == "drop":
            dropped += SPF  # missing: must come back as a PacketGap
            continue
        if action == "log_inside":
            at = draw(st.integers(11, len(frame) - 1))
            frame = frame[:at] + LOG + frame[at:]
        elif action == "junk_inside":
            at = draw(st.integers(11, len(frame) - 1))
            frame = (
                frame[:at] + draw(st.binary(min_size=1, max_size=8).filter(_harmless)) + frame[at:]
            )
        parts.append(frame)
        encoded += SPF + dropped
        dropped = 0
        if action == "log":
            parts.append(LOG)
            if draw(st.booleans()):
                parts.append(draw(st.binary(max_size=20).filter(_harmless)))
    parts.append(LOG)  # proves the last frame's extent
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return stream, encoded, cuts


def _harmless(junk: bytes) -> bool:
    """Junk that cannot itself form a prefix with its neighbours."""
    return not any(c in junk for c in b"DataInfo:[")


def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@SETTINGS
@given(session_streams())
def test_any_split_gives_the_same_events(case: tuple[bytes, int, list[int]]) -> None:
    stream, _, cuts = case
    assert comparable(feed(StreamDecoder(), pieces(stream, cuts))) == comparable(
        feed(StreamDecoder(), [stream])
    )


@SETTINGS
@given(session_streams(), st.lists(st.booleans(), max_size=13))
def test_draining_only_sometimes_gives_the_same_events(
    case: tuple[bytes, int, list[int]], drains: list[bool]
) -> None:
    """Chunks may pile up undrained (decoded in place later, one after the other)."""
    stream, _, cuts = case
    decoder = StreamDecoder()
    events = []
    for i, piece in enumerate(pieces(stream, cuts)):
        decoder.receive_data(piece)
        if i < len(drains) and drains[i]:
            events.extend(decoder.events())
    events.extend(decoder.events())
    decoder.receive_data(b"")
    events.extend(decoder.events())
    assert comparable(events) == comparable(feed(StreamDecoder(), [stream]))


@SETTINGS
@given(session_streams())
def test_delivered_plus_missing_accounts_for_every_sample(
    case: tuple[bytes, int, list[int]],
) -> None:
    stream, encoded, cuts = case
    events = feed(StreamDecoder(), pieces(stream, cuts))
    delivered = sum(e.n_samples for e in events if isinstance(e, Samples))
    missing = sum(e.missing_samples or 0 for e in events if isinstance(e, PacketGap))
    corrupt = sum(e.missing_samples(24) for e in events if isinstance(e, CorruptFrame))
    assert not any(isinstance(e, LatePacket) for e in events)
    assert delivered + missing + corrupt == encoded
    assert all(e.missing_samples is not None for e in events if isinstance(e, PacketGap))


def _check_robust(decoder: StreamDecoder, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            decoder.events()
            assert decoder.buffered_bytes <= decoder.max_buffered_bytes
        decoder.receive_data(b"")
        decoder.events()
        assert decoder.buffered_bytes == 0
    except ProtocolError:
        pass


@SETTINGS
@given(st.lists(st.binary(max_size=600), max_size=20), st.booleans())
def test_random_bytes_never_crash_or_grow_the_buffer(chunks: list[bytes], serial: bool) -> None:
    _check_robust(StreamDecoder(serial=serial, max_line_bytes=256, max_payload_bytes=512), chunks)


@SETTINGS
@given(
    session_streams(),
    st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=12)), max_size=6),
)
def test_corrupted_valid_streams_never_crash(
    case: tuple[bytes, int, list[int]], damage: list[tuple[int, bytes]]
) -> None:
    stream, _, cuts = case
    data = bytearray(stream)
    for where, junk in damage:  # overwrite, insert or delete at random places
        at = where % (len(data) + 1)
        if junk and junk[0] % 3 == 0:
            del data[at : at + len(junk)]
        elif junk and junk[0] % 3 == 1:
            data[at:at] = junk
        else:
            data[at : at + len(junk)] = junk
    _check_robust(
        StreamDecoder(max_line_bytes=256), pieces(bytes(data), [c % (len(data) + 1) for c in cuts])
    )


def test_prefix_heavy_garbage_keeps_memory_bounded() -> None:
    decoder = StreamDecoder(max_line_bytes=256, max_payload_bytes=480)
    rng = np.random.default_rng(7)
    for _ in range(200):
        chunk = bytearray(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
        for at in rng.integers(0, 495, 5):
            chunk[at : at + 5] = b"Data:" if at % 2 else b"Info:"
        decoder.receive_data(bytes(chunk))
        decoder.events()
        assert decoder.buffered_bytes <= decoder.max_buffered_bytes
