"""Conformance of the emulator with protocol.md §4 (sampling), over real sockets."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import Frame, RawClient, open_client

SAMPLE_KEYS = ["error", "cmd", "measures", "chunksize", "samplingrate", "conn_type",
               "measurements", "prefix", "flowCtr", "unit", "startTs"]
STOP_KEYS = ["msg", "sample_duration", "samples", "sent_samples", "start_ts", "stop_ts", "ip",
             "avg_rate", "cmd", "error"]


async def collect(client: RawClient, seconds: float) -> tuple[list[Frame], list[bytes]]:
    frames: list[Frame] = []
    lines: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = await client.read_item(timeout=left)
        except TimeoutError:
            break
        (frames if isinstance(item, Frame) else lines).append(item)  # type: ignore[arg-type]
    return frames, lines


async def stop_and_drain(client: RawClient) -> tuple[list[Frame], dict]:  # type: ignore[type-arg]
    """Send stop; return the frames that precede the stop reply and the reply."""
    await client.send({"cmd": "stop"})
    frames: list[Frame] = []
    while True:
        item = await client.read_item()
        if isinstance(item, Frame):
            frames.append(item)
        elif item.startswith(b'Info:{"msg":"Received stop command"'):
            import json

            return frames, json.loads(item[5:])


@pytest.mark.parametrize(
    ("payload", "msg"),
    [
        ({}, 'Not a valid "sample" command, "type" missing, "rate" missing'),
        ({"type": "TCP"}, 'Not a valid "sample" command, "rate" missing'),
        ({"rate": 8000}, 'Not a valid "sample" command, "type" missing'),
        ({"type": "TCP", "rate": 8000, "measures": "p,p,p,q,q,q"},
         "Unsupported measuresp,p,p,q,q,q"),
        ({"type": "TCP", "rate": 3000}, "SamplingRate could not be set to 3000"),
        ({"type": "TCP", "rate": 100, "measures": "p,q"},
         "SamplingRate cannot be higher than 50Hz in latch mode: p,p,p,q,q,q sampling"),
        ({"type": "UDP", "rate": 8000}, "Unsupported UDP port0"),
        ({"type": "UDP", "rate": 8000, "port": 80001}, "Unsupported UDP port80001"),
        ({"type": "FFMPEG", "rate": 8000}, "Could not connect to TCP stream"),
        ({"type": "tcp", "rate": 8000}, "Unsupported sampling type: tcp"),
    ],
)
async def test_sample_validation_messages(client: RawClient, payload: dict, msg: str) -> None:  # type: ignore[type-arg]
    """§4.1: validation order and exact messages."""
    assert await client.command({"cmd": "sample", "payload": payload}) == {
        "error": True, "cmd": "sample", "msg": msg}


async def test_rejected_sample_still_resets_stored_config(client: RawClient) -> None:
    """§4.1 step 3 / §12 #8: after the type/rate check the stored config is reset (8000 Hz)."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 4000}})
    await stop_and_drain(client)
    assert (await client.command({"cmd": "info"}))["sampling_rate"] == 4000
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 4000, "measures": "x"}})
    assert (await client.command({"cmd": "info"}))["sampling_rate"] == 8000


async def test_sample_reply_and_frames_match_ground_truth(client: RawClient, meter: EmulatedMeter) -> None:
    """§4.4/§4.6/§4.8: reply keys and values, LE frames numbered from 0, stop reply, and the
    bytes on the wire are exactly the samples the engine produced."""
    t_before = time.time()
    reply = await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000}})
    assert list(reply) == SAMPLE_KEYS
    assert reply == {**reply, "error": False, "cmd": "sample", "measures": "v,i,v,i,v,i",
                     "chunksize": 1008, "samplingrate": 8000, "conn_type": "TCP",
                     "measurements": 6, "prefix": True, "flowCtr": False,
                     "unit": "V,mA,V,mA,V,mA"}
    assert re.fullmatch(r"\d+\.\d{3}", reply["startTs"])
    assert abs(float(reply["startTs"]) - t_before) < 0.5
    frames, lines = await collect(client, 1.5)
    tail, stop = await stop_and_drain(client)
    frames += tail
    assert [f.packet for f in frames] == list(range(len(frames)))
    assert all(f.length == 1008 for f in frames[:-1]) and 0 < frames[-1].length <= 1008
    assert any(re.fullmatch(rb"Info:\[I\]\d\d/\d\d \d\d:\d\d:\d\d: \d+\.\d\dHz, \d+s", x)
               for x in lines)
    assert list(stop) == STOP_KEYS
    data = np.concatenate([f.samples(6) for f in frames])
    assert stop["samples"] == stop["sent_samples"] == len(data)
    assert stop["start_ts"] == reply["startTs"] and stop["ip"] == "127.0.0.1"
    assert abs(stop["avg_rate"] - 8000) < 160
    assert abs(stop["sample_duration"] / 1000 * 8000 - stop["samples"]) < 200
    truth = meter.truth()
    assert truth is not None and not truth.active
    np.testing.assert_array_equal(data, truth.values)
    assert np.abs(data[:, 0]).max() > 250  # volts, a real waveform


@pytest.mark.parametrize(
    ("measures", "rate", "reported", "unit", "n"),
    [
        (None, 1000, "v,i,v,i,v,i", "V,mA,V,mA,V,mA", 6),
        ("v,i", 1000, "v,i_L1", "V,mA", 2),
        ("v,i_L2", 1000, "v,i_L2", "V,mA", 2),
        ("v,i_L3", 1000, "v,i_L3", "V,mA", 2),
        ("p,q", 50, "p,p,p,q,q,q", "W,W,W,VAR,VAR,VAR", 6),
        ("v,i_RMS", 50, "v,v,v,i,i,i_RMS", "V,V,V,mA,mA,mA", 6),
    ],
)
async def test_measures_modes(client: RawClient, meter: EmulatedMeter, measures: str | None,
                              rate: int, reported: str, unit: str, n: int) -> None:
    """§4.2: every measures mode: reported names, units, floats per sample, payload sizes."""
    payload = {"type": "TCP", "rate": rate} | ({"measures": measures} if measures else {})
    reply = await client.command({"cmd": "sample", "payload": payload})
    assert (reply["measures"], reply["unit"], reply["measurements"]) == (reported, unit, n)
    frames, _ = await collect(client, 0.6)
    tail, stop = await stop_and_drain(client)
    data = np.concatenate([f.samples(n) for f in frames + tail])
    assert len(data) == stop["sent_samples"] > 0
    np.testing.assert_array_equal(data, meter.truth().values)  # type: ignore[union-attr]
    if reported == "v,v,v,i,i,i_RMS":
        assert np.all((data[:, :3] > 200) & (data[:, :3] < 260))


@pytest.mark.parametrize(
    ("rate", "measures", "type_", "chunk"),
    [
        (8000, None, "TCP", 1008), (8000, None, "UDP", 504), (8000, "v,i", "TCP", 1024),
        (8000, "v,i", "UDP", 512), (250, None, "TCP", 1008), (200, "v,i", "TCP", 256),
        (100, None, "TCP", 240), (25, "v,i", "TCP", 32), (20, "v,i", "TCP", 16),
        (1, None, "TCP", 24), (50, "p,q", "TCP", 120),
    ],
)
async def test_chunk_sizes(client: RawClient, rate: int, measures: str | None, type_: str,
                           chunk: int) -> None:
    """§4.5: chunk size table (100 ms, power of two, UDP 512 cap, whole samples)."""
    payload = {"type": type_, "rate": rate, "port": 50000} | (
        {"measures": measures} if measures else {})
    reply = await client.command({"cmd": "sample", "payload": payload})
    assert reply["chunksize"] == chunk
    if type_ == "UDP":
        assert list(reply)[:3] == ["error", "cmd", "port"] and reply["port"] == 50000
    await stop_and_drain(client)


async def test_full_chunk_only_when_more_than_one_buffered(client: RawClient) -> None:
    """§4.5/§4.8: at 32 Hz (5 samples per chunk) data lags; stop flushes the rest + short tail."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 32}})
    frames, _ = await collect(client, 1.1)
    assert all(f.length == 120 for f in frames)
    tail, stop = await stop_and_drain(client)
    streamed = sum(f.length for f in frames) // 24
    assert stop["samples"] - streamed >= 1  # at least one sample was held back
    assert tail and sum(f.length for f in tail) // 24 == stop["samples"] - streamed
    assert [f.packet for f in frames + tail] == list(range(len(frames) + len(tail)))


async def test_stop_while_idle(client: RawClient) -> None:
    """§4.8: stop while idle → {"error":true,"cmd":"stop"}."""
    await client.send({"cmd": "stop"})
    assert await client.read_line() == b'Info:{"error":true,"cmd":"stop"}'


async def test_disconnect_while_sampling_stops_silently(meter: EmulatedMeter) -> None:
    """§4.9: the sink closing → ERROR 'TCP disconnected while streaming', meter idle again."""
    watcher = await open_client(meter.command_port)
    sampler = await open_client(meter.command_port)
    await sampler.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    await sampler.close()
    line = await watcher.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b": TCP disconnected while streaming")
    assert (await watcher.command({"cmd": "info"}))["state"] == "idle"
    await watcher.close()


async def test_ring_buffer_overflow_reboots(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§4.10: cts false too long → ERROR 'Overflow during ringBuffer write, lost n samples', reboot."""
    meter = await make_meter(ring_buffer_bytes=24 * 2000)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000, "flowCtr": True}})
    line = await c.wait_line(lambda x: x.startswith(b"Info:[E]"), timeout=3.0)
    assert line.endswith(b": Overflow during ringBuffer write, lost 2000 samples")
    assert await c.closed(timeout=2.0)
    await asyncio.sleep(0.3)
    assert meter.boot_count == 2
    await (await open_client(meter.command_port)).close()


async def test_without_rtc_a_session_stops_after_rate_samples(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§4.10: no RTC → a non-latched session produces only its first `rate` samples."""
    meter = await make_meter(rtc=False)
    c = await open_client(meter.command_port)
    info = await c.command({"cmd": "info"})
    assert info["rtc"] is False
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100}})
    await collect(c, 1.6)
    _, stop = await stop_and_drain(c)
    assert stop["samples"] == 100 == stop["sent_samples"]
    await c.close()


async def test_mqtt_sampling_without_broker_stops(client: RawClient) -> None:
    """§4.9/§4.14: MQTT sampling with no broker: accepted, then ERROR and a silent stop."""
    reply = await client.command({"cmd": "sample", "payload": {"type": "MQTT", "rate": 1}})
    assert reply["error"] is False and reply["conn_type"] == "MQTT"
    line = await client.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b": MQTT Server disconnected while streaming")
    assert (await client.command({"cmd": "info"}))["state"] == "idle"


async def test_codec_decoder_reads_the_session_cleanly(client: RawClient, meter: EmulatedMeter) -> None:
    """§2.3/§4.6: the project's own StreamDecoder (client role) decodes a whole emulated session
    without skipped bytes, corrupt frames or gaps, and gets exactly the produced samples."""
    from smartmeter_ophyd.protocol import CorruptFrame, PacketGap, Samples, SkippedBytes
    from smartmeter_ophyd.protocol._decoder import StreamDecoder

    await client.send({"cmd": "sample", "payload": {"type": "TCP", "rate": 2000, "measures": "v,i_L2"}})
    raw = bytearray()
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        raw += await asyncio.wait_for(client.reader.read(65536), 1.0)
    await client.send({"cmd": "stop"})
    while b'"cmd":"stop","error":false}\r\n' not in raw:
        raw += await asyncio.wait_for(client.reader.read(65536), 2.0)
    decoder = StreamDecoder()
    decoder.receive_data(bytes(client.buffer) + bytes(raw))
    events = decoder.events() + decoder.release_pending()
    assert not [e for e in events if isinstance(e, SkippedBytes | CorruptFrame | PacketGap)]
    values = np.concatenate([e.values for e in events if isinstance(e, Samples)])
    np.testing.assert_array_equal(values.reshape(-1, 2), meter.truth().values)  # type: ignore[union-attr]
