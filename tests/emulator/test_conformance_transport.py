"""Conformance of the emulator with protocol.md §2 (transport on the command port), over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
import time

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import LOG_RE, RawClient, open_client

INFO_KEYS = [
    "cmd", "type", "version", "compiled", "sys_time", "name", "ip", "mqtt_server",
    "stream_server", "time_server", "sampling_rate", "buffer_size", "psram", "rtc", "state",
    "energy", "dailyReset", "calibration", "ssids",
]


async def test_info_line_is_first_and_complete(meter: EmulatedMeter) -> None:
    """§2.1/§2.5: the first bytes on connect are the info line, keys in firmware order."""
    c = await open_client(meter.command_port, read_info=False)
    line = await c.read_line()
    assert line.startswith(b'Info:{"cmd":"info","type":"smartmeter","version":"2.2",'
                           b'"compiled":"Nov  3 2021 18:09:15","sys_time":"')
    info = json.loads(line[5:])
    assert list(info) == INFO_KEYS
    assert info["name"] == meter.name and info["ip"] == "127.0.0.1"
    assert info["sampling_rate"] == 8000 and info["buffer_size"] == 3670016
    assert info["psram"] is True and info["rtc"] is True and info["state"] == "idle"
    assert info["energy"] == "[0.0000, 0.0000, 0.0000]"
    assert info["dailyReset"] == "None" and info["ssids"] == "[]"
    assert b'"calibration":[1,1,1,1,1,1]' in line
    assert re.fullmatch(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d\.\d{3}", info["sys_time"])
    await c.close()


async def test_fourth_client_is_refused_without_bytes(meter: EmulatedMeter) -> None:
    """§2.1: max 3 clients; the 4th is closed with no bytes, the others get the INFO log."""
    clients = [await open_client(meter.command_port) for _ in range(3)]
    fourth = await open_client(meter.command_port, read_info=False)
    assert await fourth.closed(timeout=2.0)
    assert fourth.buffer == b""
    line = await clients[0].wait_line(lambda x: b"To much clients" in x)
    assert re.match(LOG_RE, line) and line.startswith(b"Info:[I]")
    assert line.endswith(b": To much clients, could not add client")
    for c in clients:
        await c.close()


async def test_connect_and_disconnect_are_logged_to_others(meter: EmulatedMeter) -> None:
    """§2.1: INFO logs 'Client with IP … connected on port …' / 'Client disconnected … port …'."""
    first = await open_client(meter.command_port)
    second = await open_client(meter.command_port)
    port = second.writer.get_extra_info("sockname")[1]
    line = await first.wait_line(lambda x: b"connected on port" in x)
    assert line.endswith(f": Client with IP 127.0.0.1 connected on port {port}".encode())
    await second.close()
    line = await first.wait_line(lambda x: b"Client disconnected" in x)
    assert line.endswith(f": Client disconnected 127.0.0.1 port {port}".encode())
    await first.close()


async def test_probe_keepalive_and_several_commands_in_one_segment(client: RawClient) -> None:
    """§2.2: '?' → Info:Setup done; '!' → nothing; one segment may carry several commands."""
    await client.send(b'?anything\n!\n{"cmd":"cts","value":true}\r\n{"cmd":"getPeriod"}\n')
    lines = []
    while len(lines) < 3:
        line = await client.read_line()
        if not line.startswith(b"Info:["):
            lines.append(line)
    assert lines[0] == b"Info:Setup done"
    assert lines[1] == b'Info:{"error":false,"cmd":"cts"}'
    assert json.loads(lines[2][5:])["cmd"] == "getPeriod"


async def test_log_lines_go_to_all_clients_at_their_level(meter: EmulatedMeter) -> None:
    """§2.4/§2.7: errors are broadcast; a client at 'error' gets no lifeness/INFO lines."""
    a = await open_client(meter.command_port)
    b = await open_client(meter.command_port)
    reply = await b.command({"cmd": "log", "level": "error"})
    assert reply == {"error": False, "cmd": "log", "msg": "Log Level set to: error"}
    await a.send(b'{"cmd":oops}\n')
    expected = b": deserializeJson() failed: __cmd_:oops_"
    for c in (a, b):
        line = await c.wait_line(lambda x: x.startswith(b"Info:[E]"))
        assert line.endswith(expected), line
    # b is at ERROR: within 1.5 s it must see no lifeness, while a sees at least one.
    await asyncio.sleep(1.5)
    await b.send({"cmd": "getPeriod"})
    assert (await b.read_line()).startswith(b'Info:{"error":false,"cmd":"getPeriod"')
    await a.wait_line(lambda x: re.fullmatch(rb"Info:\[I\]\d\d/\d\d \d\d:\d\d:\d\d: ", x) is not None)
    await a.close()
    await b.close()


async def test_lifeness_every_second_while_idle(client: RawClient) -> None:
    """§2.6: 'Info:[I]MM/DD HH:MM:SS: ' (trailing space) roughly once a second."""
    stamps = []
    while len(stamps) < 3:
        line = await client.read_line(timeout=2.0)
        assert re.fullmatch(rb"Info:\[I\]\d\d/\d\d \d\d:\d\d:\d\d: ", line), line
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(0.95 < g < 1.3 for g in gaps), gaps


async def test_malformed_and_format_errors(client: RawClient) -> None:
    """§2.7: bad JSON/empty line → ERROR log only; JSON without cmd → format error reply;
    unknown cmd → WARNING log then the unknown-command reply."""
    await client.send(b"\n")
    line = await client.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b": deserializeJson() failed: ")
    await client.send(b"[1,2]\n")
    assert await client.read_json() == {
        "error": True,
        "msg": 'JSON format error, syntax: {"cmd":<cmdName>, "[payload":{<data>}]}}',
    }
    await client.send({"cmd": "fly"})
    line = await client.wait_line(lambda x: x.startswith(b"Info:[W]"))
    assert line.endswith(b": Received unknown command")
    assert await client.read_json() == {"error": True, "cmd": "fly", "msg": "unknown command"}


async def test_busy_reply_names_device_ip(client: RawClient, meter: EmulatedMeter) -> None:
    """§2.8: busy-checked commands while sampling reply with the device's own IP."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100}})
    other = await open_client(meter.command_port)
    reply = await other.command({"cmd": "getVoltage"})
    assert reply == {"error": True, "cmd": "getVoltage",
                     "msg": "Device with IP: 127.0.0.1 currently sampling", "state": "busy"}
    await other.send({"cmd": "stop"})
    reply = await other.read_json()
    assert list(reply)[0] == "msg" and reply["cmd"] == "stop"
    await other.close()


async def test_busy_without_network_sink_says_currently_sampling(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§2.8: 'Currently sampling' when no TCP/UDP sink was set since boot (Serial session)."""
    meter = await make_meter(serial=True)
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "sample", "payload": {"type": "Serial", "rate": 100}})
    assert reply["error"] is False and reply["chunksize"] == 120
    assert (await c.command({"cmd": "getPower"}))["msg"] == "Currently sampling"
    await c.close()
