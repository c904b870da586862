"""Hypothesis fuzz of the reply parser (issue 9, hostile input): any ``Info:`` line the
decoder turns into a reply, parsed as the answer to any command, gives a typed view or a
``ProtocolError`` - never another exception - and the decoder's buffer stays bounded.

The decoder's own fuzzing (random bytes, corrupted streams) is in
tests/protocol/test_decoder_hypothesis.py; this file fuzzes what comes after it.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmeter_ophyd.protocol import COMMANDS, ProtocolError, Reply, parse_reply
from smartmeter_ophyd.protocol._decoder import StreamDecoder

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KNOWN_KEYS = [
    "cmd", "error", "msg", "voltage", "current", "power", "apparent", "energy", "unit",
    "startTs", "start", "days", "period", "state", "samples", "sent_samples", "avg_rate",
    "sample_duration", "start_ts", "stop_ts", "chunksize", "measures", "rate", "prefix",
    "current_time", "ssid", "pwd", "ssids", "regValue", "newRegValue", "name", "version",
    "type", "compiled", "sys_time", "ip", "sampling_rate", "buffer_size", "psram", "rtc",
    "calibration", "dailyReset", "time_server", "mqtt_server", "stream_server", "value",
]
LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
          | st.floats(allow_nan=False) | st.text(max_size=40))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
COMMAND_NAMES = sorted(COMMANDS) + ["nonsense", ""]


@st.composite
def reply_lines(draw: st.DrawFn) -> tuple[bytes, str]:
    expected = draw(st.sampled_from(COMMAND_NAMES))
    fields = draw(st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), VALUES,
                                  max_size=10))
    if draw(st.booleans()):
        fields["cmd"] = expected if draw(st.booleans()) else draw(st.sampled_from(COMMAND_NAMES))
    if draw(st.booleans()):
        fields["error"] = draw(st.booleans())
    text = json.dumps(fields)  # Infinity too: what a broken peer may send
    line = b"Info:" + text.encode("utf-8", errors="surrogatepass") + b"\r\n"
    return line, expected


def replies_of(line: bytes) -> list[Reply]:
    decoder = StreamDecoder()
    decoder.receive_data(line)
    events = list(decoder.events())
    assert decoder.buffered_bytes <= len(line)
    return [e for e in events if isinstance(e, Reply)]


@SETTINGS
@given(reply_lines())
def test_any_reply_parses_to_a_view_or_a_protocol_error(case: tuple[bytes, str]) -> None:
    line, expected = case
    for reply in replies_of(line):
        try:
            view = parse_reply(reply, expected)
        except ProtocolError:
            continue
        repr(view)  # a view must be printable (no lazy failure inside)
        for value in getattr(view, "values", ()) or ():
            assert isinstance(value, float) and not math.isnan(value) or value is None, view


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(COMMAND_NAMES))
def test_random_bytes_after_info_never_escape_as_another_error(
    junk: bytes, expected: str
) -> None:
    for reply in replies_of(b"Info:{" + junk + b"\r\n"):
        try:
            parse_reply(reply, expected)
        except ProtocolError:
            pass
