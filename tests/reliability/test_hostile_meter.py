"""Hostile input that tests/client/test_hostile.py does not cover yet (issue 9): a fake meter
sending non-UTF-8 bytes, wrong types in known keys or a ``Data:`` frame declaring a huge
length, WiFi passwords in errors and ``raw_fields``, and device-supplied names as file paths.
(A fly against a meter whose stream turns into such a frame: test_stream_cut.py.)

A hostile peer must end in a typed ``MeterError`` naming the meter (or be tolerated with the
value kept as text), never in another exception type, within the client's timeout.
"""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

import plans
from smartmeter_ophyd.client import AsyncMeterClient, MeterError
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from tests.client.client_fakes import INFO_LINE, FakePeer
from tests.client.test_hostile import Flood

TIMEOUT = 1.0


async def outcome(greeting: bytes, reply: bytes | None = None) -> tuple[object, float]:
    """Connect (and ask ``getVoltage`` when ``reply`` is given) to a fake meter; return the
    result or the exception, and the seconds it took."""
    peer = await FakePeer(greeting, lambda line: [reply] if reply is not None else []).start()
    client = AsyncMeterClient("127.0.0.1", peer.port, name="hostile", timeout=TIMEOUT,
                              reconnect=False)
    started = time.monotonic()
    try:
        result: object = await client.connect()
        if reply is not None:
            result = await client.get_voltage()
    except Exception as exc:  # judged by the caller
        result = exc
    finally:
        await client.close()
        await peer.close()
    return result, time.monotonic() - started


def assert_typed_or_kept(result: object, took: float, port_free: bool = True) -> None:
    if isinstance(result, BaseException):
        assert isinstance(result, MeterError), f"{type(result).__name__}: {result}"
        assert "smartmeter hostile" in str(result) or "smartmeter fake" in str(result), result
    assert took < 3 * TIMEOUT + 1


@pytest.mark.parametrize("greeting", [
    pytest.param(INFO_LINE.replace(b'"fake"', b'"\xff\xfe\xc3("'), id="name"),
    pytest.param(b"Info:\xff\xfe\x80\x81\r\n", id="whole-line"),
    pytest.param(INFO_LINE.replace(b"Info:", b"In\xc3fo:"), id="prefix"),
])
async def test_non_utf8_bytes_in_the_info_line(greeting: bytes) -> None:
    result, took = await outcome(greeting)
    assert_typed_or_kept(result, took)


@pytest.mark.parametrize("replace", [
    (b'"sampling_rate":8000', b'"sampling_rate":"fast"'),
    (b'"buffer_size":3670016', b'"buffer_size":[1,2]'),
    (b'"version":"2.2"', b'"version":2.2'),
    (b'"psram":true', b'"psram":"yes"'),
    (b'"calibration":[1,1,1,1,1,1]', b'"calibration":{"a":1}'),
    (b'"name":"fake"', b'"name":null'),
    (b'"energy":"[0.0000, 0.0000, 0.0000]"', b'"energy":7'),
    (b'"ssids":"[]"', b'"ssids":[1,2]'),
], ids=lambda r: r[1].decode())
async def test_wrong_types_in_the_info_line(replace: tuple[bytes, bytes]) -> None:
    result, took = await outcome(INFO_LINE.replace(*replace))
    assert_typed_or_kept(result, took)


@pytest.mark.parametrize("reply", [
    b'Info:{"error":false,"cmd":"getVoltage","voltage":"abc","unit":"V"}\r\n',
    b'Info:{"error":false,"cmd":"getVoltage","voltage":[1,2],"unit":"V"}\r\n',
    b'Info:{"error":false,"cmd":"getVoltage","voltage":[1,"x",3],"unit":"V"}\r\n',
    b'Info:{"error":false,"cmd":"getVoltage","voltage":[1,2,3],"unit":5}\r\n',
    b'Info:{"error":"no","cmd":"getVoltage","voltage":[1,2,3],"unit":"V"}\r\n',
    b'Info:{"error":false,"cmd":"getVoltage","voltage":[1e999,2,3],"unit":"V"}\r\n',
    b'Info:{"error":false,"cmd":"getVoltage","voltage":[1,2,3],"unit":"\xff"}\r\n',
    b'Info:[1,2,3]\r\n',
    b'Info:"getVoltage"\r\n',
], ids=lambda r: r[5:60].decode(errors="replace"))
async def test_wrong_types_in_a_reading_reply(reply: bytes) -> None:
    result, took = await outcome(INFO_LINE, reply)
    assert_typed_or_kept(result, took)
    if not isinstance(result, BaseException):  # kept: only numbers may come out as readings
        values = getattr(result, "values", ())
        assert all(isinstance(v, float) for v in values), result


# ------------------------------------------------------------------ a Data: frame of huge length

HUGE_FRAME = struct.pack("<5sHI", b"Data:", 0xFFFF, 0)
"""A frame header declaring 65535 payload bytes (§4.6; the firmware's frames are <= 1024, §4.5)."""
FLOOD_BYTES = 32 << 20


async def flooded(head: bytes, ask: bool) -> tuple[object, float, int, int]:
    """A fake meter sends ``head`` then megabytes without a frame or line start; connect
    (and ``getVoltage`` when ``ask``).  Returns (result or exception, seconds, peak traced
    memory, bytes the peer got to send)."""
    flood = await Flood(head, FLOOD_BYTES).start()
    client = AsyncMeterClient("127.0.0.1", flood.port, name="hostile", timeout=TIMEOUT,
                              reconnect=False)
    tracemalloc.start()
    started = time.monotonic()
    try:
        result: object = await client.connect()
        if ask:
            result = await client.get_voltage()
    except Exception as exc:  # judged by the caller
        result = exc
    finally:
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        await client.close()
        await flood.close()
    return result, took, peak, flood.sent


@pytest.mark.parametrize("head, ask", [
    pytest.param(HUGE_FRAME, False, id="instead-of-the-info-line"),
    pytest.param(INFO_LINE + HUGE_FRAME, True, id="instead-of-a-reply"),
])
async def test_a_data_frame_of_huge_length_ends_in_a_meter_error_in_bounded_time_and_memory(
    head: bytes, ask: bool
) -> None:
    result, took, peak, _ = await flooded(head, ask)
    assert isinstance(result, MeterError), f"{type(result).__name__}: {result}"
    assert_typed_or_kept(result, took)  # names the meter ("fake" once its info line came)
    assert peak < 16 << 20, f"peak traced memory {peak / 1e6:.1f} MB"


# ------------------------------------------------------------------ WiFi passwords

SECRET = "Zq9SecretPW-way-too-long"
SHORT_SECRET = "Zq9Secret"


async def test_a_refused_wifi_password_is_not_in_the_error() -> None:
    with EmulatorFleet(1, name_prefix="wifi") as fleet:
        async with AsyncMeterClient(*fleet.addresses[0], timeout=3.0) as client:
            with pytest.raises(MeterError) as info:
                await client.add_wifi("labnet", SECRET)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


async def accepted_wifi(caplog) -> object:
    caplog.set_level(logging.DEBUG)
    with EmulatorFleet(1, name_prefix="wifi") as fleet:
        async with AsyncMeterClient(*fleet.addresses[0], timeout=3.0) as client:
            return await client.add_wifi("labnet", SHORT_SECRET)


async def test_an_accepted_wifi_password_is_not_in_the_reply_repr_or_the_logs(caplog) -> None:
    reply = await accepted_wifi(caplog)
    assert SHORT_SECRET not in repr(reply)
    assert SHORT_SECRET not in caplog.text


async def test_an_accepted_wifi_password_is_not_in_the_raw_fields(caplog) -> None:
    reply = await accepted_wifi(caplog)
    assert SHORT_SECRET not in repr(reply.raw_fields)


# ------------------------------------------------------------------ device-supplied names

def test_a_meter_named_like_a_path_writes_under_the_data_directory(
    fleet_factory, engine, embedded_catalog, tmp_path
) -> None:
    fleet = fleet_factory([{"name": "../../etc/x"}])
    data = Path(embedded_catalog.data_directory) / f"named-{time.monotonic_ns()}"
    meter = SmartMeter(*fleet.addresses[0], name="m1", data_directory=data, timeout=3.0)
    try:
        engine.RE(plans.synchronized_fly([meter], 0.5))
        path = Path(meter.last_summary and meter.hdf5_path).resolve()
    finally:
        meter.destroy()
    assert path.is_relative_to(data.resolve()), path
    assert [p.resolve() for p in data.iterdir()] == [path]


def test_a_device_named_like_a_path_writes_under_the_data_directory(
    fleet_factory, embedded_catalog
) -> None:
    fleet = fleet_factory(1)
    data = Path(embedded_catalog.data_directory) / f"named-{time.monotonic_ns()}"
    meter = SmartMeter(*fleet.addresses[0], name="../../etc/x", data_directory=data,
                       timeout=3.0)
    try:
        meter.prepare({"rate": 8000, "duration_s": 0.3})
        meter.kickoff().wait(10)
        meter.complete().wait(10)
        path = Path(meter.hdf5_path).resolve()
    finally:
        meter.destroy()
    assert path.parent == data.resolve(), path  # one plain file name, no separator
