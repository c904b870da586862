"""UDP (§4.13) and USB serial over a pseudo-terminal (§4.12) against the emulator."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import socket
import struct
import time
from typing import Any

import numpy as np

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import RawClient, open_client
from .test_conformance_sampling import collect, stop_and_drain


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


async def test_udp_sampling(client: RawClient, meter: EmulatedMeter) -> None:
    """§4.13: one frame per datagram (≤ 504 payload bytes for 24-byte modes) to the requester's
    IP and port; the stop reply comes over TCP; datagram payloads are the produced samples."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    reply = await client.command({"cmd": "sample", "payload": {"type": "UDP", "rate": 8000, "port": port}})
    assert reply["port"] == port and reply["chunksize"] == 504 and reply["conn_type"] == "UDP"
    await asyncio.sleep(0.8)
    frames, stop = await stop_and_drain(client)
    assert frames == []  # nothing on TCP
    await asyncio.sleep(0.1)
    transport.close()
    packets = [struct.unpack_from("<5sHI", d) for d in proto.received]
    assert all(p[0] == b"Data:" for p in packets)
    assert [p[2] for p in packets] == list(range(len(packets)))
    assert all(len(d) == 11 + p[1] and p[1] <= 504 for d, p in zip(proto.received, packets, strict=True))
    data = np.concatenate([np.frombuffer(d[11:], dtype="<f4").reshape(-1, 6) for d in proto.received])
    assert len(data) == stop["sent_samples"] == stop["samples"]
    np.testing.assert_array_equal(data, meter.truth().values)  # type: ignore[union-attr]


async def test_client_reset_while_sampling_is_an_ordinary_disconnect(meter: EmulatedMeter) -> None:
    """§2.1/§4.9: a client that resets its connection (SO_LINGER 0) mid-session is found gone
    on the 100 ms poll like one that closed ('Client disconnected'); the reset is retrieved, so asyncio reports no unretrieved
    exception, neither through the loop's exception handler nor its logger."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    asyncio_records: list[logging.LogRecord] = []
    capture = logging.Handler(logging.DEBUG)
    capture.emit = asyncio_records.append  # type: ignore[method-assign]
    logging.getLogger("asyncio").addHandler(capture)
    try:
        watcher = await open_client(meter.command_port)
        resetter = await open_client(meter.command_port)
        await resetter.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 32000}})
        await asyncio.sleep(0.3)  # not reading: the meter's send backlog builds up
        peer_port = resetter.writer.get_extra_info("sockname")[1]
        sock = resetter.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetter.writer.transport.abort()  # close with linger 0: the peer gets an RST
        gone = await watcher.wait_line(lambda x: b"Client disconnected" in x)
        assert gone.endswith(f"Client disconnected 127.0.0.1 port {peer_port}".encode())
        del resetter, sock
        for _ in range(3):  # let every callback run and every dead future be finalised
            await asyncio.sleep(0.05)
            gc.collect()
        assert (await watcher.command({"cmd": "getPeriod"}))["cmd"] == "getPeriod"
        await watcher.close()
    finally:
        logging.getLogger("asyncio").removeHandler(capture)
        loop.set_exception_handler(previous_handler)
    messages = [str(c.get("message")) for c in reported] + [r.getMessage() for r in asyncio_records]
    assert not [m for m in messages if "never retrieved" in m or "exception" in m.lower()], messages


async def test_udp_requester_disconnect_stops(meter: EmulatedMeter) -> None:
    """§4.9: the TCP connection that issued a UDP session closing stops it."""
    watcher = await open_client(meter.command_port)
    requester = await open_client(meter.command_port)
    await requester.command({"cmd": "sample", "payload": {"type": "UDP", "rate": 100, "port": 9}})
    await requester.close()
    line = await watcher.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b": TCP/UDP disconnected while streaming")
    await watcher.close()


class SerialPort:
    """Minimal reader of the pty slave (what pyserial would open)."""

    def __init__(self, path: str) -> None:
        import termios
        import tty

        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        termios.tcflush(self.fd, termios.TCIOFLUSH)
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    async def read_for(self, seconds: float) -> bytes:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.buffer += os.read(self.fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def close(self) -> None:
        os.close(self.fd)


async def test_serial_commands_and_logs(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§4.12/§2.4: serial gets replies and all logs (level ALL); each serial command logs
    ERROR 'MESSAGE Over Serial' to the TCP clients."""
    meter = await make_meter(serial=True)
    tcp = await open_client(meter.command_port)
    port = SerialPort(meter.serial_path)
    await port.read_for(0.1)
    port.write(b'{"cmd":"getPeriod"}\r\n')
    text = await port.read_for(0.5)
    assert re.search(rb"Info:\[E\]\d\d/\d\d \d\d:\d\d:\d\d: MESSAGE Over Serial\r\n", text)
    assert b'Info:{"error":false,"cmd":"getPeriod","period":[' in text
    line = await tcp.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b": MESSAGE Over Serial")
    # Replies to TCP requests are copied to serial (§2.8).
    await tcp.command({"cmd": "getVoltage"})
    assert b'"cmd":"getVoltage"' in await port.read_for(0.3)
    port.close()
    await tcp.close()


async def test_serial_sampling_frames_end_with_crlf(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§4.12: chunks of 120 bytes (24-byte modes), each frame followed by CRLF."""
    meter = await make_meter(serial=True)
    port = SerialPort(meter.serial_path)
    port.write(b'{"cmd":"sample","payload":{"type":"Serial","rate":1000}}\n')
    data = await port.read_for(0.8)
    port.write(b'{"cmd":"stop"}\n')
    data += await port.read_for(0.5)
    port.close()
    start = data.index(b'Info:{"error":false,"cmd":"sample"')
    reply_end = data.index(b"\r\n", start)
    assert json.loads(data[start + 5 : reply_end])["chunksize"] == 120
    stream = data[reply_end + 2 :]
    n_frames, offset, packets = 0, 0, []
    while (i := stream.find(b"Data:", offset)) >= 0:
        length, packet = struct.unpack_from("<HI", stream, i + 5)
        end = i + 11 + length
        if length == 120:
            assert stream[end : end + 2] == b"\r\n"
        packets.append(packet)
        n_frames += 1
        offset = end
    assert n_frames > 20 and packets[: n_frames] == list(range(n_frames))
    assert b'"cmd":"stop","error":false' in stream


async def test_serial_commands_ignored_while_sampling_elsewhere(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§4.12: while sampling to a non-serial sink, serial commands are ignored."""
    meter = await make_meter(serial=True)
    tcp = await open_client(meter.command_port)
    await tcp.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100}})
    port = SerialPort(meter.serial_path)
    await port.read_for(0.1)
    port.write(b'{"cmd":"getPeriod"}\n')
    text = await port.read_for(0.5)
    assert b'"cmd":"getPeriod"' not in text and b"MESSAGE Over Serial" not in text
    port.close()
    await collect(tcp, 0.1)
    await stop_and_drain(tcp)
    await tcp.close()
