"""The test-only control channel: ground truth and fault injection, over its JSON-lines socket."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import Frame, RawClient, open_client, track
from .test_conformance_sampling import collect, stop_and_drain


class Control:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        self.writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
        return json.loads(await asyncio.wait_for(self.reader.readline(), 3.0))


async def control_of(meter: EmulatedMeter) -> Control:
    assert meter.control_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", meter.control_port)
    return Control(reader, track(writer))


async def test_status_and_truth(make_meter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Ground truth: start instants, offset, counts and the produced samples as .npy."""
    meter = await make_meter(control_port=0, clock_offset_s=0.25)
    ctl = await control_of(meter)
    status = await ctl("status")
    assert status["ok"] and status["command_port"] == meter.command_port and not status["sampling"]
    assert (await ctl("truth"))["ok"] is False
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    frames, _ = await collect(c, 0.5)
    live = await ctl("truth")
    assert live["active"] is True and live["reported_start_ts"] == reply["startTs"]
    tail, stop = await stop_and_drain(c)
    npy = tmp_path / "values.npy"
    truth = await ctl("truth", npy=str(npy))
    assert truth["ok"] and truth["active"] is False
    assert truth["samples_produced"] == stop["samples"] and truth["sent_samples"] == stop["sent_samples"]
    assert abs(truth["clock_offset_s"]) < 0.01  # NTP at boot removed the 0.25 s error
    values = np.load(npy)
    received = np.concatenate([f.samples(6) for f in frames + tail])
    np.testing.assert_array_equal(values, received)
    assert (await ctl("nonsense"))["ok"] is False
    await c.close()


async def test_garbage_and_log_in_frame(make_meter) -> None:  # type: ignore[no-untyped-def]
    """Faults: garbage bytes before the next frame; a log line inside the next frame."""
    meter = await make_meter(control_port=0)
    ctl = await control_of(meter)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    first = await c.read_item()
    assert isinstance(first, Frame)
    await ctl("garbage", hex="00ff00ff")
    await ctl("log_in_frame", text="hello inside")
    raw = bytearray(c.buffer)
    c.buffer.clear()
    while len(raw) < 6000:
        raw += await asyncio.wait_for(c.reader.read(65536), 2.0)
    assert b"\x00\xff\x00\xffData:" in raw
    i = raw.index(b"hello inside")
    start = raw.rindex(b"Data:", 0, i)
    (length,) = struct.unpack_from("<H", raw, start + 5)
    assert start + 11 < i < start + 11 + length  # the log line sits inside the frame
    await c.close()


async def test_drop_udp_stall_and_connections(make_meter) -> None:  # type: ignore[no-untyped-def]
    """Faults: dropped datagrams leave packet-number gaps; stall delays output; drop kills TCP."""
    meter = await make_meter(control_port=0)
    ctl = await control_of(meter)
    c = await open_client(meter.command_port)
    received: list[bytes] = []

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received.append(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    await ctl("drop_udp", count=3)
    await c.command({"cmd": "sample", "payload": {"type": "UDP", "rate": 1000, "port": port}})
    await asyncio.sleep(0.5)
    packets = [struct.unpack_from("<I", d, 7)[0] for d in received]
    assert packets[0] == 3 and packets == list(range(3, 3 + len(packets)))
    await ctl("stall", seconds=0.6)
    await asyncio.sleep(0.05)
    n = len(received)
    await asyncio.sleep(0.4)
    assert len(received) == n  # nothing leaves a stalled meter
    await asyncio.sleep(0.6)
    assert len(received) > n
    await ctl("drop_connections")
    assert await c.closed(timeout=2.0)
    transport.close()


async def test_reboot_via_control(make_meter) -> None:  # type: ignore[no-untyped-def]
    """Fault: reboot drops the connections; the meter is back on the same port."""
    meter: EmulatedMeter = await make_meter(control_port=0)
    ctl = await control_of(meter)
    c: RawClient = await open_client(meter.command_port)
    assert (await ctl("reboot"))["ok"]
    assert await c.closed(timeout=2.0)
    await asyncio.sleep(0.3)
    assert (await ctl("status"))["boot_count"] == 2
    await (await open_client(meter.command_port)).close()


async def test_cli_prints_one_line_per_meter_and_stops_on_sigterm(ntp_server) -> None:  # type: ignore[no-untyped-def]
    """``python -m smartmeter_ophyd.emulator --count 2``: one JSON line per meter, runs until SIGTERM."""
    import signal
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smartmeter_ophyd.emulator", "--count", "2", "--name-prefix", "cli",
        "--time-server", "127.0.0.1", "--ntp-port", str(ntp_server.port), "--control-port", "0",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)) for _ in range(2)]
    assert [m["name"] for m in lines] == ["cli000", "cli001"]
    assert all(m["serial"].startswith("/dev/pts/") and m["control_port"] for m in lines)
    c = await open_client(lines[1]["command_port"])
    info = await c.command({"cmd": "info"})
    assert info["name"] == "cli001"
    await c.close()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _ntp_conf(c: RawClient) -> int:
    """Send ``{"cmd": "ntp"}``; the confidence the meter logs (§6.2)."""
    await c.send({"cmd": "ntp"})
    line = await c.wait_line(lambda b: b"NTP synced with conf: " in b)
    return int(line.rsplit(b"conf: ", 1)[1].split(b"\r")[0])


async def test_clock_step_and_network_ops(make_meter) -> None:  # type: ignore[no-untyped-def]
    """step_clock shows in the meter's own startTs; set_network in its NTP confidence."""
    meter = await make_meter(control_port=0)
    ctl = await control_of(meter)
    clock = await ctl("clock")
    (boot,) = (await ctl("ntp_history"))["history"]
    # SNTP sets a clock right to within half its round trip, whatever the host's load
    assert clock["ok"] and clock["synced"] is True
    assert abs(clock["clock_error_s"]) <= boot["rtt_s"] / 2 + 0.001
    stepped = await ctl("step_clock", delta_s=-0.4)
    assert stepped["ok"] and abs(stepped["clock_error_s"] - clock["clock_error_s"] + 0.4) < 1e-4
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    truth = await ctl("truth")
    assert abs(float(reply["startTs"]) - truth["true_start"] - stepped["clock_error_s"]) < 0.002
    await stop_and_drain(c)
    assert await ctl("set_network", delay_s=0.02) == {"ok": True, "delay_s": 0.02, "jitter_s": 0.0}
    # half the 40 ms round trip, truncated to ms, + up to 5 ms of loop latency on a busy host
    assert 20 <= await _ntp_conf(c) <= 25
    history = (await ctl("ntp_history"))["history"]
    assert len(history) == 2  # the boot sync and this one
    # the 40 ms round trip is symmetric, so only the host's own delays are left in the error
    bound = (history[1]["rtt_s"] - 0.04) / 2 + 0.001
    assert abs((await ctl("clock"))["clock_error_s"]) <= bound  # the sync set the clock right
    assert 20 <= history[1]["confidence_ms"] <= 25 and abs(history[1]["error_s"]) <= bound
    assert history[0]["true_time"] < history[1]["true_time"] and history[1]["rtt_s"] >= 0.04
    assert (await ctl("set_network", jitter_s=0.001))["delay_s"] == 0.02
    for op, args, problem in [
        ("step_clock", {}, "op 'step_clock' needs 'delta_s'"),
        ("step_clock", {"delta_s": "1"}, "'delta_s' must be a number, not '1'"),
        ("step_clock", {"delta_s": 1e9}, "clock step 1000000000.0 s is not plausible"),
        ("set_network", {"delay_s": -1}, "network delay -1 s"),
        ("no_such_op", {}, "unknown control op 'no_such_op'"),
    ]:
        answer = await ctl(op, **args)
        assert answer["ok"] is False and answer["error"].startswith(f"smartmeter {meter.name}: ")
        assert problem in answer["error"], answer
    await c.close()


async def test_sample_times_and_corrections(make_meter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A clock 50 ms behind at the start makes the in-session NTP queue +10 samples (§6.5):
    the duplicate the control channel names is the one repeated row the client receives."""
    meter = await make_meter(control_port=0)
    ctl = await control_of(meter)
    assert (await ctl("corrections"))["ok"] is False  # no session yet
    await ctl("step_clock", delta_s=-0.05)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    await c.send({"cmd": "ntp"})
    frames, lines = await collect(c, 1.2)
    assert any(b"Correcting: 10 samples" in line for line in lines), lines
    should_be = next(line for line in lines if b"Should be: " in line)
    tail, _ = await stop_and_drain(c)
    received = np.concatenate([f.samples(6) for f in frames + tail])
    repeated = np.flatnonzero(np.all(received[1:] == received[:-1], axis=1)) + 1
    corr = await ctl("corrections")
    assert corr["ok"] and corr["duplicates"] == repeated.tolist() and len(repeated) == 1
    assert corr["pending"] == 9 and corr["correction_drops"] == [] and corr["fillers"] == []
    (record,) = corr["sync_records"]
    assert record["queued"] == 10
    assert f"Should be: {record['goal']}, is {record['total']} samples".encode() in should_be
    d = int(repeated[0])
    pair = await ctl("sample_times", start=d - 1, stop=d + 1)
    assert pair["kinds"] == [0, 1] and pair["true_times"][0] == pair["true_times"][1]
    truth = await ctl("truth")
    first = await ctl("sample_times", index=0)
    assert first["start"] == 0 and first["stop"] == 1
    assert abs(first["true_times"][0] - truth["true_start"]) < 1e-6
    step = await ctl("sample_times", start=1, stop=4)
    assert np.allclose(np.diff(step["true_times"]), 1e-3, rtol=0, atol=1e-6)  # float64 unix ulp
    n = len(received)
    npz = tmp_path / "times.npz"
    whole = await ctl("sample_times", npz=str(npz))
    assert whole["stop"] == n and "true_times" not in whole
    with np.load(npz) as data:
        assert data["true_times"].shape == (n,) and np.flatnonzero(data["kinds"]).tolist() == [d]
    beyond = await ctl("sample_times", start=n + 1)
    assert beyond["ok"] is False and f"outside the {n} rows" in beyond["error"]
    await c.close()
