"""Conformance of the emulator with protocol.md §5 (flow control), over real sockets."""

from __future__ import annotations

import asyncio

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import Frame, RawClient, open_client
from .test_conformance_sampling import collect, stop_and_drain


async def test_cts_messages(client: RawClient) -> None:
    """§5.1: missing value → error whose msg itself starts with 'Info:'; success even when idle."""
    await client.send({"cmd": "cts"})
    assert await client.read_line() == (
        b'Info:{"error":true,"cmd":"cts","msg":"Info:Not a valid \\"cts\\" command"}')
    await client.send({"cmd": "cts", "value": False})
    assert await client.read_line() == b'Info:{"error":false,"cmd":"cts"}'


async def test_flow_control_holds_data_until_cts(client: RawClient, meter: EmulatedMeter) -> None:
    """§5.1: flowCtr:true starts paused; cts true sends the whole backlog at once."""
    reply = await client.command(
        {"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "flowCtr": True}})
    assert reply["flowCtr"] is True
    frames, _ = await collect(client, 0.6)
    assert frames == []
    await client.send({"cmd": "cts", "value": True})
    assert await client.read_line() == b'Info:{"error":false,"cmd":"cts"}'
    frames, _ = await collect(client, 0.3)
    assert sum(f.length for f in frames) // 24 >= 500  # the ~0.6 s backlog arrived
    await stop_and_drain(client)


async def test_slots(client: RawClient) -> None:
    """§5.3: slot → rts false, reply echoes the array; slots=1 always matches slot 0;
    slots=0 never sends until cts true."""
    reply = await client.command(
        {"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "slot": [0, 1]}})
    assert list(reply)[:3] == ["error", "cmd", "slot"] and reply["slot"] == [0, 1]
    frames, _ = await collect(client, 0.5)
    assert frames and all(f.length == 1008 for f in frames)
    await stop_and_drain(client)
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "slot": [0, 0]}})
    frames, _ = await collect(client, 0.5)
    assert frames == []
    await client.send({"cmd": "cts", "value": True})
    frames, _ = await collect(client, 0.3)
    assert frames
    await stop_and_drain(client)


async def test_req_samples_rules(client: RawClient) -> None:
    """§5.2: idle error; range text; silent success with one N-sample frame; then rts=true."""
    assert await client.command({"cmd": "reqSamples", "samples": 20}) == {
        "error": True, "cmd": "reqSamples"}
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "flowCtr": True}})
    await asyncio.sleep(0.2)
    await client.send({"cmd": "reqSamples", "samples": 20})
    first = await client.read_item()
    while isinstance(first, bytes) and first.startswith(b"Info:["):
        first = await client.read_item()
    assert isinstance(first, Frame) and first.length == 20 * 24 and first.packet == 0
    frames, lines = await collect(client, 0.5)
    assert not [x for x in lines if x.startswith(b"Info:{")]  # success is silent
    assert frames and frames[0].packet == 1  # rts is now true: streaming continues
    _, stop = await stop_and_drain(client)
    assert stop["error"] is False


async def test_req_samples_range_error_text(client: RawClient) -> None:
    """§5.2: N ≤ 10 or N > 2000 → 'stay between 10 and 100000 samples, not <N>'."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100, "flowCtr": True}})
    reply = await client.command({"cmd": "reqSamples", "samples": 10})
    assert reply == {"error": True, "cmd": "reqSamples",
                     "msg": "stay between 10 and 100000 samples, not 10"}
    await stop_and_drain(client)


async def test_req_samples_latched_is_refused(client: RawClient) -> None:
    """§5.2: reqSamples only in non-latched sampling."""
    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 10, "measures": "p,q"}})
    await client.send({"cmd": "reqSamples", "samples": 20})
    reply = await client.read_json(skip_frames=True)
    assert reply == {"error": True, "cmd": "reqSamples"}
    await stop_and_drain(client)


async def test_req_samples_beyond_send_buffer_reboots(meter: EmulatedMeter) -> None:
    """§5.2: > 1029 payload bytes overruns the device: emulated as ERROR log + reboot."""
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000, "flowCtr": True}})
    await asyncio.sleep(0.1)
    await c.send({"cmd": "reqSamples", "samples": 43})
    line = await c.wait_line(lambda x: x.startswith(b"Info:[E]"))
    assert line.endswith(b"1032 bytes overflow the 1040 byte send buffer")
    assert await c.closed()
    await asyncio.sleep(0.3)
    assert meter.boot_count == 2


async def test_slot_summary_log(client: RawClient) -> None:
    """§5.3: with [0, 2] data flows only in even meter seconds; when the slot ends the meter
    logs INFO 'sent <n> samples' (or WARNING 'not finisched <n> missing')."""
    import re
    import time

    await client.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "slot": [0, 2]}})
    frames_by_second: dict[int, int] = {}
    summary = None
    deadline = time.monotonic() + 3.5
    while summary is None and time.monotonic() < deadline:
        item = await client.read_item()
        now = time.time()
        if isinstance(item, Frame) and 0.25 < now % 1 < 0.95:  # clear of read lag at boundaries
            frames_by_second[int(now)] = frames_by_second.get(int(now), 0) + 1
        elif isinstance(item, bytes) and re.search(rb": (sent \d+ samples|not finisched \d+ missing)$", item):
            summary = item
    assert summary is not None
    odd = sum(n for s, n in frames_by_second.items() if s % 2)
    even = sum(n for s, n in frames_by_second.items() if s % 2 == 0)
    assert even > 0 and odd == 0
    await stop_and_drain(client)
