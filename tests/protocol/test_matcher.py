"""MeterConnection's reply matching and session tracking, from bytes alone (no sockets).

Every case runs on the whole byte string, one byte at a time, and (hypothesis) split at
arbitrary points: the connection's events must not depend on how TCP cut the stream.
The byte strings are the firmware's, verbatim (protocol.md §2.8, §2.9, §3, §4.4, §4.8,
Appendix B); the socket tests in tests/client keep covering the same rules end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartmeter_ophyd.protocol import (
    Ade9kAccess,
    Answered,
    Cts,
    Event,
    Failed,
    GetCurrent,
    GetLog,
    GetPower,
    GetVoltage,
    Info,
    InfoLine,
    LateReply,
    LogLine,
    Measures,
    MeterConnection,
    NtpSync,
    PlainLine,
    RefusedLine,
    Reply,
    RequestSamples,
    Restart,
    Sample,
    SessionEnded,
    SessionStarted,
    SetCalibration,
    SetDailyRestart,
    Stop,
    StrayReply,
    encode_frames,
    parse_log_dump,
)

INFO = (
    b'Info:{"cmd":"info","type":"smartmeter","version":"2.2","compiled":"Nov  3 2021 18:09:15",'
    b'"sys_time":"03/02/2021 10:37:07.662","name":"smartmeterX","ip":"192.168.0.138",'
    b'"mqtt_server":"-","stream_server":"-","time_server":"time.google.com",'
    b'"sampling_rate":8000,"buffer_size":3670016,"psram":true,"rtc":true,"state":"idle",'
    b'"energy":"[0.0000, 0.0000, 0.0000]","dailyReset":"None","calibration":[1,1,1,1,1,1],'
    b'"ssids":"[]"}\r\n'
)
LIFENESS = b"Info:[I]03/02 10:37:08: \r\n"
LOG_OTHER = b"Info:[I]03/02 10:42:24: Client with IP 192.168.0.7 connected on port 51234\r\n"
VOLTAGE = b'Info:{"error":false,"cmd":"getVoltage","voltage":[230.1,229.8,231.0],"unit":"V"}\r\n'
CURRENT = b'Info:{"error":false,"cmd":"getCurrent","current":[1000.5,20.25,300],"unit":"mA"}\r\n'
SAMPLE = (
    b'Info:{"error":false,"cmd":"sample","measures":"v,i,v,i,v,i","chunksize":1008,'
    b'"samplingrate":4000,"conn_type":"TCP","measurements":6,"prefix":true,"flowCtr":false,'
    b'"unit":"V,mA,V,mA,V,mA","startTs":"1614677828.512"}\r\n'
)
STOP = (
    b'Info:{"msg":"Received stop command","sample_duration":2043,"samples":126,'
    b'"sent_samples":126,"start_ts":"1614677828.512","stop_ts":"1614677830.555",'
    b'"ip":"192.168.0.138","avg_rate":4000,"cmd":"stop","error":false}\r\n'
)
STOP_IDLE = b'Info:{"error":true,"cmd":"stop"}\r\n'
CALIBRATION = (
    b'Info:{"error":false,"cmd":"v1:1.00, i1:1.00, v2","msg":"Calibration set: v1:1.00, '
    b'i1:1.00, v2:1.00, i2:1.00, v3:1.00, i3:1.00"}\r\n'
)
DAILY = b'Info:{"error":false,"cmd":"y restart to: 03:15:00","msg":"Set daily restart to: 03:15:00"}\r\n'
ADE = b'Info:{"error":false,"cmd":"x04b9, Read: 0x","msg":"Addr: 0x04b9, Read: 0x1234","regValue":4660}\r\n'
GETLOG_DUMP = (
    b'Info:{"cmd":"log","msg":"*** LOGFile *** //nInfo:[W]03/02 11:26:20: "quoted" warn//n'
    b'03/02 11:00:00: Reboot - inited SPIFFS Logger//n*** LOGFile *** "}\r\n'
)
GETLOG_FINAL = b'Info:{"error":false,"cmd":"Reboot - inited SPIF"}\r\n'
BUSY_POWER = (
    b'Info:{"error":true,"cmd":"getPower","msg":"Device with IP: 192.168.0.138 currently '
    b'sampling","state":"busy"}\r\n'
)
BUSY_CALIBRATION = BUSY_POWER.replace(b"getPower", b"calibration")
NTP_OK = b'Info:{"error":true,"cmd":"ntp","msg":"Time synced","current_time":"03/02/2021 10:42:24.120"}\r\n'
REQ_REFUSED = b'Info:{"error":true,"cmd":"reqSamples"}\r\n'
VALUES = np.arange(42 * 6 * 3, dtype=np.float32).reshape(-1, 6)
FRAMES = encode_frames(0, VALUES, 42)


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


SPLITS = pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])


def feed(connection: MeterConnection, pieces: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        connection.receive_data(piece)
        events += connection.events()
    return events


def summary(events: list[Event]) -> list[Any]:
    """Events as comparable values; consecutive Samples merged (their cut depends on reads)."""
    out: list[Any] = []
    for event in events:
        if type(event).__name__ == "Samples":
            values = event.values  # type: ignore[attr-defined]
            if out and isinstance(out[-1], np.ndarray):
                out[-1] = np.concatenate([out[-1], values])
            else:
                out.append(values)
        elif isinstance(event, Answered | LateReply):
            raw = event.reply.raw if isinstance(event.reply, Reply) else event.reply.text
            out.append((type(event).__name__, event.request.name, raw))
        elif isinstance(event, SessionStarted):
            out.append(("SessionStarted", event.request.name, event.stream))
        else:
            out.append(event)
    return out


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def answers(events: list[Event]) -> dict[str, bytes | str]:
    return {
        e.request.name: e.reply.raw if isinstance(e.reply, Reply) else e.reply.text
        for e in events
        if isinstance(e, Answered)
    }


def connected(split: Callable[[bytes], list[bytes]]) -> MeterConnection:
    connection = MeterConnection()
    events = feed(connection, split(INFO + LIFENESS))
    assert kinds(events) == ["InfoLine", "LogLine"]
    return connection


@SPLITS
def test_info_line_on_connect_then_answers_every_info_request(split) -> None:
    connection = connected(split)
    first, second = connection.send(Info()), connection.send(Info())
    assert first.data == b'{"cmd":"info"}\n'
    events = feed(connection, split(INFO))
    assert isinstance(events[0], InfoLine)
    assert [e.request for e in events if isinstance(e, Answered)] == [first, second]
    assert not connection.awaiting_reply


@SPLITS
def test_swapped_replies_with_logs_interleaved(split) -> None:
    connection = connected(split)
    voltage, current = connection.send(GetVoltage()), connection.send(GetCurrent())
    events = feed(connection, split(LOG_OTHER + LIFENESS + CURRENT + LOG_OTHER + VOLTAGE))
    assert kinds(events) == ["LogLine", "LogLine", "Answered", "LogLine", "Answered"]
    assert [e.request for e in events if isinstance(e, Answered)] == [current, voltage]
    assert not connection.awaiting_reply


@SPLITS
def test_same_command_twice_is_answered_in_order(split) -> None:
    connection = connected(split)
    first, second = connection.send(GetVoltage()), connection.send(GetVoltage())
    later = VOLTAGE.replace(b"230.1", b"1.0")
    events = [e for e in feed(connection, split(VOLTAGE + later)) if isinstance(e, Answered)]
    assert [(e.request, e.reply.raw) for e in events] == [
        (first, VOLTAGE[5:-2].decode()),
        (second, later[5:-2].decode()),
    ]


@SPLITS
def test_corrupted_cmd_echoes_are_matched_in_order(split) -> None:
    """§2.9: calibration, dailyRestart, ade9k and getLog's final line echo fragments."""
    connection = connected(split)
    cal = connection.send(SetCalibration((1, 1, 1, 1, 1, 1)))
    day = connection.send(SetDailyRestart(3, 15))
    ade = connection.send(Ade9kAccess(0x4B9, 32))
    log = connection.send(GetLog())
    stream = LOG_OTHER + CALIBRATION + DAILY + ADE + GETLOG_DUMP + LIFENESS + GETLOG_FINAL
    events = feed(connection, split(stream))
    assert [e.request for e in events if isinstance(e, Answered)] == [cal, day, ade, log]
    assert log.dump is not None
    assert parse_log_dump(log.dump) == [
        'Info:[W]03/02 11:26:20: "quoted" warn',
        "03/02 11:00:00: Reboot - inited SPIFFS Logger",
    ]
    assert not any(isinstance(e, StrayReply) for e in events)


@SPLITS
def test_loose_reply_does_not_take_a_reliable_requests_reply(split) -> None:
    connection = connected(split)
    cal = connection.send(SetCalibration((1, 1, 1, 1, 1, 1)))
    voltage = connection.send(GetVoltage())
    events = feed(connection, split(VOLTAGE + CALIBRATION))
    assert [e.request for e in events if isinstance(e, Answered)] == [voltage, cal]


@SPLITS
def test_busy_replies_answer_their_request(split) -> None:
    """§2.8: a busy refusal echoes cmd intact, also for a garbled-echo command."""
    connection = connected(split)
    power = connection.send(GetPower())
    cal = connection.send(SetCalibration((1, 1, 1, 1, 1, 1)))
    events = feed(connection, split(BUSY_POWER + BUSY_CALIBRATION))
    assert [e.request for e in events if isinstance(e, Answered)] == [power, cal]


@SPLITS
def test_busy_get_log_is_answered_without_a_dump(split) -> None:
    connection = connected(split)
    log = connection.send(GetLog())
    events = feed(connection, split(BUSY_POWER.replace(b"getPower", b"getLog")))
    assert [e.request for e in events if isinstance(e, Answered)] == [log]
    assert log.dump is None


@SPLITS
def test_final_get_log_line_before_its_dump_answers_nothing(split) -> None:
    connection = connected(split)
    log = connection.send(GetLog())
    events = feed(connection, split(GETLOG_FINAL))
    assert kinds(events) == ["StrayReply"] and connection.awaiting_reply
    events = feed(connection, split(GETLOG_DUMP + GETLOG_FINAL))
    assert [e.request for e in events if isinstance(e, Answered)] == [log]


@SPLITS
def test_inverted_error_flag_is_matched_not_judged(split) -> None:
    connection = connected(split)
    ntp = connection.send(NtpSync())
    events = feed(connection, split(NTP_OK))
    assert answers(events) == {"ntp": NTP_OK[5:-2].decode()}
    assert ntp not in connection.waiting()


@SPLITS
def test_late_reply_after_abandon_answers_nothing(split) -> None:
    connection = connected(split)
    first = connection.send(GetVoltage())
    connection.abandon(first)
    assert not connection.awaiting_reply
    second = connection.send(GetVoltage())
    late, due = VOLTAGE.replace(b"230.1", b"1"), VOLTAGE.replace(b"230.1", b"2")
    events = feed(connection, split(late + due))
    assert kinds(events) == ["LateReply", "Answered"]
    assert events[0].request is first and events[1].request is second
    assert events[1].reply.fields["voltage"][0] == 2


@SPLITS
def test_unsolicited_reply_is_stray(split) -> None:
    connection = connected(split)
    events = feed(connection, split(VOLTAGE))
    assert kinds(events) == ["StrayReply"] and events[0].reason == "nobody waits for it"


@SPLITS
def test_probe_answered_by_setup_done_and_keepalive_waits_for_nothing(split) -> None:
    connection = connected(split)
    probe = connection.send_probe()
    assert probe.data == b"?\n"
    events = feed(connection, split(LIFENESS + b"Info:Setup done\r\n"))
    assert kinds(events) == ["LogLine", "PlainLine", "Answered"]
    assert events[2].request is probe and isinstance(events[2].reply, PlainLine)


@SPLITS
def test_silent_and_rebooting_commands(split) -> None:
    """§5.2: reqSamples is silent on success, its refusal is stray; §3.15: restart drops."""
    connection = connected(split)
    request = connection.send(RequestSamples(20, Measures.VI))
    assert request.data.startswith(b'{"cmd":"reqSamples"') and not connection.awaiting_reply
    events = feed(connection, split(REQ_REFUSED))
    assert kinds(events) == ["StrayReply"] and "reqSamples refused" in events[0].reason
    assert not connection.expect_drop
    connection.send(Restart())
    assert connection.expect_drop and not connection.awaiting_reply


@SPLITS
def test_appendix_b_session_start_frames_and_stop(split) -> None:
    """The sample reply and first frames in one segment; stop's error comes last (§4.8)."""
    connection = connected(split)
    sample = connection.send(Sample(rate=4000))
    events = feed(connection, split(SAMPLE + FRAMES[:1500] + LIFENESS[:0]))
    assert kinds(events)[:2] == ["Answered", "SessionStarted"]
    started = events[1]
    assert isinstance(started, SessionStarted) and started.request is sample
    assert started.stream.values_per_sample == 6 and started.stream.chunk_bytes == 1008
    assert connection.session_active
    stop = connection.send(Stop())
    assert connection.stopping
    events += feed(connection, split(FRAMES[1500:] + STOP))
    got = summary(events)
    np.testing.assert_array_equal(got[2], VALUES)
    assert got[3] == ("Answered", "stop", STOP[5:-2].decode())
    ended = events[-1]
    assert isinstance(ended, SessionEnded) and ended.reason == "stop"
    assert ended.reply is not None and ended.reply.fields["sent_samples"] == 126
    assert stop not in connection.waiting() and not connection.session_active
    assert connection.decoder.session is None


@SPLITS
def test_lifeness_after_data_means_stopped_elsewhere(split) -> None:
    connection = connected(split)
    connection.send(Sample(rate=4000))
    events = feed(connection, split(SAMPLE + FRAMES + LIFENESS))
    assert kinds(events)[-2:] == ["SessionEnded", "LogLine"]
    assert events[-2] == SessionEnded("stopped elsewhere", None)
    assert not connection.session_active and connection.decoder.session is None


@SPLITS
def test_lifeness_during_a_countdown_or_our_stop_does_not_end_the_session(split) -> None:
    """§6.4: a scheduled start leaves the meter idle (lifeness goes on) until it starts."""
    connection = connected(split)
    connection.send(Sample(rate=4000))
    events = feed(connection, split(SAMPLE + LIFENESS + LIFENESS))
    assert "SessionEnded" not in kinds(events) and connection.session_active
    events = feed(connection, split(FRAMES))
    connection.send(Stop())
    events = feed(connection, split(LIFENESS + STOP))
    assert kinds(events)[-1] == "SessionEnded" and events[-1].reason == "stop"


@SPLITS
def test_idle_stop_reply_ends_a_session_stopped_elsewhere(split) -> None:
    connection = connected(split)
    connection.send(Sample(rate=4000))
    feed(connection, split(SAMPLE))
    connection.send(Stop())
    events = feed(connection, split(STOP_IDLE))
    assert kinds(events) == ["Answered", "SessionEnded"]
    assert events[1].reason == "stopped elsewhere"


@SPLITS
def test_refused_sample_starts_no_session(split) -> None:
    connection = connected(split)
    connection.send(Sample(rate=4000))
    refused = b'Info:{"error":true,"cmd":"sample","msg":"SamplingRate could not be set to 7"}\r\n'
    events = feed(connection, split(refused))
    assert kinds(events) == ["Answered"] and not connection.session_active


@SPLITS
def test_late_sample_reply_starts_no_session(split) -> None:
    connection = connected(split)
    sample = connection.send(Sample(rate=4000))
    connection.abandon(sample)
    events = feed(connection, split(SAMPLE))
    assert kinds(events) == ["LateReply"] and not connection.session_active


@SPLITS
def test_deep_json_reply_fails_every_waiting_request(split) -> None:
    connection = connected(split)
    voltage, cts = connection.send(GetVoltage()), connection.send(Cts(True))
    deep = b"Info:" + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"\r\n"
    events = feed(connection, split(deep) if split is whole else [deep[:7000], deep[7000:]])
    refused = [e for e in events if isinstance(e, RefusedLine)]
    assert refused and "10000 levels" in refused[0].reason
    assert {e.request for e in events if isinstance(e, Failed)} == {voltage, cts}
    assert not connection.awaiting_reply
    events = feed(connection, split(VOLTAGE))  # forgotten: no later request inherits it
    assert kinds(events) == ["StrayReply"]
    after = connection.send(GetVoltage())
    assert [e.request for e in feed(connection, split(VOLTAGE))] == [after]


@SPLITS
def test_overflow_log_is_noticed(split) -> None:
    connection = connected(split)
    overflow = b"Info:[E]03/02 10:42:24: Overflow during ringBuffer write, lost 152917 samples\r\n"
    events = feed(connection, split(overflow))
    assert isinstance(events[0], LogLine) and connection.overflow_announced


def test_close_returns_the_waiting_requests() -> None:
    connection = connected(whole)
    voltage = connection.send(GetVoltage())
    abandoned = connection.send(GetCurrent())
    connection.abandon(abandoned)
    probe = connection.send_probe()
    assert connection.close() == [voltage, probe]
    assert not connection.awaiting_reply


def test_forget_drops_an_unwritten_request() -> None:
    connection = connected(whole)
    voltage = connection.send(GetVoltage())
    connection.forget(voltage)
    assert kinds(feed(connection, [VOLTAGE])) == ["StrayReply"]


STREAM = (
    LOG_OTHER + SAMPLE + FRAMES[:2000] + LOG_OTHER + FRAMES[2000:] + CALIBRATION + VOLTAGE
    + GETLOG_DUMP + GETLOG_FINAL + STOP
)


def scripted() -> MeterConnection:
    connection = connected(whole)
    connection.send(Sample(rate=4000))
    connection.send(SetCalibration((1, 1, 1, 1, 1, 1)))
    connection.send(GetVoltage())
    connection.send(GetLog())
    connection.send(Stop())
    return connection


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(STREAM)]
    pieces = [STREAM[a:b] for a, b in zip(points, points[1:], strict=False)]
    expected = summary(feed(scripted(), [STREAM]))
    got = summary(feed(scripted(), pieces))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
