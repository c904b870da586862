"""Conformance of the emulator with protocol.md §7 (port 54322 raw stream, stream-server dial-out)."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import RawClient, open_client
from .test_conformance_sampling import stop_and_drain


async def read_raw(reader: asyncio.StreamReader, seconds: float) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def test_raw_stream_on_connect(meter: EmulatedMeter, client: RawClient) -> None:
    """§7.1: an idle meter streams unprefixed 8 kHz 6-channel floats at once, no text ever;
    command clients get busy replies; stop closes the raw socket and replies to the requester."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", meter.stream_port)
    data = await read_raw(reader, 1.0)
    elapsed = time.monotonic() - t0
    assert b"Info:" not in data and b"Data:" not in data
    assert 4000 * 24 < len(data) <= (8000 * elapsed + 42) * 24  # 8 kHz × 24 bytes, never ahead
    values = np.frombuffer(data[: len(data) // 24 * 24], dtype="<f4").reshape(-1, 6)
    assert np.abs(values[:, 0]).max() > 250
    busy = await client.command({"cmd": "getVoltage"})
    assert busy["state"] == "busy" and busy["msg"] == "Device with IP: 127.0.0.1 currently sampling"
    info = await client.command({"cmd": "info"})
    assert info["state"] == "busy"
    _, stop = await stop_and_drain(client)
    assert stop["error"] is False and stop["sent_samples"] <= stop["samples"]
    rest = await read_raw(reader, 1.0)
    assert reader.at_eof(), "stop must close the raw stream socket"
    received = np.frombuffer(data + rest, dtype="<f4").reshape(-1, 6)
    truth = meter.truth()
    assert truth is not None
    np.testing.assert_array_equal(received, truth.values[: len(received)])
    writer.close()


async def test_raw_stream_inherits_last_decimation(meter: EmulatedMeter, client: RawClient) -> None:
    """§7.1/§12 #25: after a 4000 Hz command the raw stream runs at 4000 Hz."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 4000}})
    await stop_and_drain(client)
    reader, writer = await asyncio.open_connection("127.0.0.1", meter.stream_port)
    t0 = time.monotonic()
    data = await read_raw(reader, 1.0)
    assert 2000 * 24 < len(data) <= (4000 * (time.monotonic() - t0) + 42) * 24  # not 8000 Hz
    writer.close()
    line = await client.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b": TCP disconnected while streaming")
    # standardConfig() reset the stored rate although the stream ran at 4000 Hz.
    assert (await client.command({"cmd": "info"}))["sampling_rate"] == 8000


async def test_stream_server_dial_out(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§7.2: the meter dials <streamServer>:54322 and treats the socket as a command client."""
    accepted: asyncio.Queue[RawClient] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(RawClient(reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    meter = await make_meter(stream_server_port=port, stream_server_period_s=0.5)
    watcher = await open_client(meter.command_port)
    reply = await watcher.command({"cmd": "streamServer", "payload": {"server": "127.0.0.1"}})
    assert reply["stream_server"] == "127.0.0.1"
    dialled = await asyncio.wait_for(accepted.get(), 3.0)
    info = await dialled.read_json()
    assert info["cmd"] == "info" and info["stream_server"] == "127.0.0.1"
    line = await watcher.wait_line(lambda x: b"StreamServer" in x)
    assert line.endswith(b": Connected to StreamServer: 127.0.0.1")
    sample = await dialled.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000}})
    assert sample["error"] is False
    frames = []
    while len(frames) < 3:
        item = await dialled.read_item()
        if not isinstance(item, bytes):
            frames.append(item)
    assert frames[0].packet == 0
    await stop_and_drain(dialled)
    await dialled.close()
    await watcher.close()
    server.close()


async def test_stream_server_unreachable_warns_once(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§7.2: the first failed dial logs WARNING 'Cannot connect to StreamServer: <s>' once."""
    meter = await make_meter(stream_server_period_s=0.3)  # stream_server_port 9: refused
    c = await open_client(meter.command_port)
    await c.send({"cmd": "streamServer", "payload": {"server": "127.0.0.1"}})
    line = await c.wait_line(lambda x: x.startswith(b"Info:[I]") and b"Stream Server" in x)
    assert line.endswith(b": Try to connect Stream Server: 127.0.0.1")
    line = await c.wait_line(lambda x: x.startswith(b"Info:[W]"))
    assert line.endswith(b": Cannot connect to StreamServer: 127.0.0.1")
    await asyncio.sleep(1.0)
    await c.send({"cmd": "getLog"})
    log = await c.wait_line(lambda x: x.startswith(b'Info:{"cmd":"log"'))
    assert log.count(b"Cannot connect to StreamServer") == 1
    await c.close()
