"""Conformance of the emulator with protocol.md §6 (time, NTP, scheduled start), over real sockets."""

from __future__ import annotations

import re
import time

import numpy as np

from smartmeter_ophyd.emulator import EmulatedMeter
from smartmeter_ophyd.protocol import format_short_time

from .conftest import NtpServer
from .emulator_wire import RawClient, open_client
from .test_conformance_sampling import collect, stop_and_drain


async def test_timestamps_are_zero_without_ntp(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§6.1/§12 #33: before any NTP success unix timestamps read 0.000."""
    meter = await make_meter(ntp_port=9, clock_offset_s=5.0)
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100}})
    assert reply["startTs"] == "0.000"
    _, stop = await stop_and_drain(c)
    assert stop["start_ts"] == stop["stop_ts"] == "0.000"
    await c.close()


async def test_log_times_are_local_time(client: RawClient) -> None:
    """§6.1: log lines carry the short local time (UTC+1, EU DST) once NTP is synced."""
    line = await client.wait_line(lambda x: x.startswith(b"Info:[I]"))
    stamp = re.match(rb"Info:\[I\](\d\d/\d\d \d\d:\d\d:\d\d): ", line).group(1).decode()  # type: ignore[union-attr]
    candidates = {format_short_time(time.time() + d) for d in (-2, -1, 0)}
    assert stamp in candidates


async def test_ntp_sync_sets_the_clock(make_meter, ntp_server: NtpServer) -> None:  # type: ignore[no-untyped-def]
    """§6.2: after boot sync the meter's startTs is true time despite a 5 s clock error."""
    meter = await make_meter(clock_offset_s=5.0)
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100}})
    assert abs(float(reply["startTs"]) - time.time()) < 0.3
    await stop_and_drain(c)
    assert ntp_server.protocol.requests >= 1
    await c.close()


async def test_scheduled_start(client: RawClient, meter: EmulatedMeter) -> None:
    """§6.4: immediate reply with msg and startTs; idle countdown (lifeness, stop → error,
    no cancel); acquisition starts ≈1 ms before the requested second."""
    at = int(time.time()) + 3
    reply = await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "time": at}})
    assert list(reply)[-2:] == ["startTs", "msg"] and reply["error"] is False
    assert reply["startTs"] == f"{at}.000"
    assert re.fullmatch(
        r"Should sample at: \d\d/\d\d/\d{4} \d\d:\d\d:\d\d\.000//nStart sampling in: (\d+)ms",
        reply["msg"])
    assert (await client.command({"cmd": "info"}))["state"] == "idle"
    await client.send({"cmd": "stop"})
    assert (await client.read_json()) == {"error": True, "cmd": "stop"}
    await client.wait_line(lambda x: x.endswith(b": "), timeout=2.0)  # lifeness during countdown
    frames, _ = await collect(client, at - time.time() + 0.5)
    assert frames
    _, stop = await stop_and_drain(client)
    truth = meter.truth()
    assert truth is not None
    # on the meter's own clock it starts 1 ms early; in true time, off by its clock's error
    assert abs(truth.meter_start_ts - (at - 0.001)) < 0.001
    assert abs(truth.true_start - (at - 0.001) + meter.clock_error_s()) < 0.001
    assert stop["start_ts"] == f"{at - 1}.999"


async def test_scheduled_start_outside_window(client: RawClient) -> None:
    """§6.4: a past time wraps in unsigned 32-bit ms arithmetic → 'Cannot start sampling'."""
    at = int(time.time()) - 5
    reply = await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "time": at}})
    assert reply["error"] is True and "startTs" not in reply
    delta = int(re.search(r"Cannot start sampling in: (\d+)ms", reply["msg"]).group(1))  # type: ignore[union-attr]
    assert 2**32 - 6000 < delta < 2**32


async def test_scheduled_latched_start_streams_waveform(client: RawClient, meter: EmulatedMeter) -> None:
    """§6.4 step 4 / §12 #23: a scheduled p,q start delivers raw v,i values under p,q labels."""
    at = int(time.time()) + 2
    reply = await client.command(
        {"cmd": "sample", "payload": {"type": "TCP", "rate": 50, "measures": "p,q", "time": at}})
    assert reply["measures"] == "p,p,p,q,q,q" and reply["error"] is False
    frames, _ = await collect(client, at - time.time() + 1.2)
    tail, _ = await stop_and_drain(client)
    data = np.concatenate([f.samples(6) for f in frames + tail])
    np.testing.assert_array_equal(data, meter.truth().values)  # type: ignore[union-attr]
    # Columns 0, 2, 4 are the three instantaneous line voltages: they nearly cancel and one
    # of them is always near its peak -- three active powers would do neither.
    volts = data[:, [0, 2, 4]].astype(np.float64)
    assert np.all(np.abs(volts).max(axis=1) > 250)
    assert np.all(np.abs(volts.sum(axis=1)) < 60)


async def test_ntp_during_sampling_corrects_rate(client: RawClient, ntp_server: NtpServer) -> None:
    """§6.5: an NTP step of +50 ms during sampling logs the correction lines and queues +10."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    await collect(client, 0.5)
    ntp_server.protocol.offset_s = 0.05
    await client.send({"cmd": "ntp"})
    texts = []
    while True:
        line = await client.wait_line(lambda x: x.startswith((b"Info:[", b"Info:{")))
        if line.startswith(b"Info:{"):
            break
        texts.append(line.split(b": ", 1)[1].decode())
    assert any(t.startswith("NTP synced with conf: ") for t in texts)
    assert any(re.fullmatch(r"After NTP Sync: avg rate \d+\.\d{3} Hz", t) for t in texts)
    assert any(re.fullmatch(r"Should be: \d+, is \d+ samples", t) for t in texts)
    assert any(re.fullmatch(r"Offset of 0\.0\d\d s, SecondInterrupts \d+, SamplingDur \d+\.\d{3}", t)
               for t in texts)
    assert any(t.startswith("From ") for t in texts) and any(t.startswith("To ") for t in texts)
    assert "Correcting: 10 samples" in texts
    await stop_and_drain(client)
