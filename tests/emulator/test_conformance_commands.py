"""Conformance of the emulator with protocol.md §3 (command reference), over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from smartmeter_ophyd.emulator import EmulatedMeter

from .emulator_wire import RawClient, open_client

LONG_TIME = r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d\.\d{3}"


async def test_log_command(client: RawClient) -> None:
    """§3.1: missing/unknown level errors; success echoes the level string as sent."""
    assert await client.command({"cmd": "log"}) == {
        "error": True, "cmd": "log", "msg": "Not a valid Log level cmd, level missing"}
    assert await client.command({"cmd": "log", "level": "loud"}) == {
        "error": True, "cmd": "log", "msg": "Unknown log level: loud"}
    await client.send({"cmd": "log", "level": "warning"})
    assert await client.read_line() == (
        b'Info:{"error":false,"cmd":"log","msg":"Log Level set to: warning"}')


async def test_mdns_logs_before_reply_and_persists(client: RawClient, meter: EmulatedMeter) -> None:
    """§3.2: validation texts; 'MDNS Name: …' INFO log precedes the reply; stored name changes."""
    assert (await client.command({"cmd": "mdns", "payload": {}}))["msg"] == (
        "MDNS name required in payload with key name")
    assert (await client.command({"cmd": "mdns", "payload": {"name": "x" * 25}}))["msg"] == (
        "MDNS name too long, only string of size 25 allowed")
    await client.send({"cmd": "mdns", "payload": {"name": "lab-meter"}})
    line = await client.read_line()
    while line.endswith(b": "):  # a lifeness line may come first
        line = await client.read_line()
    assert line.startswith(b"Info:[I]") and line.endswith(b": MDNS Name: lab-meter")
    assert await client.read_json() == {"error": False, "cmd": "mdns",
                                        "msg": "Set MDNS name to: lab-meter",
                                        "mdns_name": "lab-meter"}
    assert meter.name == "lab-meter"


@pytest.mark.parametrize(
    ("cmd", "missing", "too_long", "limit", "ok", "key"),
    [
        ("mqttServer", "MQTTServer address required in payload with key server",
         "MQTTServer address too long, only string of size 17 allowed", 17,
         "Set MQTTServer address to: {}", "mqtt_server"),
        ("streamServer", "StreamServer address required in payload with key server",
         "StreamServer address too long, only string of size 17 allowed", 17,
         "Set StreamServer address to: {}", "stream_server"),
        ("timeServer", "StreamServer address required in payload with key server",
         "TimeServer address too long, only string of size 25 allowed", 25,
         "Set TimeServer address to: {}", "time_server"),
    ],
)
async def test_server_setters(client: RawClient, cmd: str, missing: str, too_long: str,
                              limit: int, ok: str, key: str) -> None:
    """§3.3–§3.5: texts (incl. the timeServer 'StreamServer' slip), length limits, reply keys."""
    assert await client.command({"cmd": cmd, "payload": {}}) == {
        "error": True, "cmd": cmd, "msg": missing}
    assert (await client.command({"cmd": cmd, "payload": {"server": "a" * limit}}))["msg"] == too_long
    value = "127.0.0.1"
    reply = await client.command({"cmd": cmd, "payload": {"server": value}})
    assert reply == {"error": False, "cmd": cmd, "msg": ok.format(value), key: value}
    info = await client.command({"cmd": "info"})
    assert info[key] == value


async def test_time_server_syncs_before_reply(client: RawClient) -> None:
    """§3.5: a blocking NTP sync whose 'NTP synced with conf' log precedes the reply."""
    await client.send({"cmd": "timeServer", "payload": {"server": "127.0.0.1"}})
    line = await client.wait_line(lambda x: b"NTP synced with conf: " in x)
    assert re.search(rb": NTP synced with conf: \d+$", line)
    assert (await client.read_json())["time_server"] == "127.0.0.1"


async def test_wifi_list_quirks(client: RawClient) -> None:
    """§3.6: inverted flags, trailing comma-space in ssids, 5 slots, placeholder matching."""
    assert (await client.command({"cmd": "addWifi", "payload": {"ssid": "a"}}))["msg"] == (
        "WiFi SSID and PWD required, for open networks, fill empty pwd")
    assert (await client.command({"cmd": "addWifi", "payload": {"ssid": "s" * 20, "pwd": ""}}))[
        "msg"] == "SSID or PWD too long, max: 20, 20"
    await client.send({"cmd": "addWifi", "payload": {"ssid": "energywifi", "pwd": "pw"}})
    assert await client.read_line() == (
        b'Info:{"error":true,"cmd":"addWifi","ssid":"energywifi","pwd":"pw",'
        b'"msg":"New Ap, SSID: energywifi, PW: pw","ssids":"[energywifi, ]"}')
    dup = await client.command({"cmd": "addWifi", "payload": {"ssid": "energywifi", "pwd": "x"}})
    assert dup == {"error": True, "cmd": "addWifi", "msg": "Wifi AP energywifi already in list",
                   "ssids": "[energywifi, ]"}
    for i in range(4):
        await client.command({"cmd": "addWifi", "payload": {"ssid": f"n{i}", "pwd": ""}})
    full = await client.command({"cmd": "addWifi", "payload": {"ssid": "more", "pwd": ""}})
    assert full["error"] is False and full["msg"] == "MAX # APs reached, need to delete first"
    removed = await client.command({"cmd": "delWifi", "payload": {"ssid": "n0"}})
    assert removed == {"error": False, "cmd": "delWifi", "msg": "Removed SSID: n0",
                       "ssids": "[energywifi, n1, n2, n3, ]"}
    missing = await client.command({"cmd": "delWifi", "payload": {"ssid": "zz"}})
    assert missing == {"error": True, "cmd": "delWifi", "msg": "SSID zz not found",
                       "ssids": "[energywifi, n1, n2, n3, ]"}
    assert (await client.command({"cmd": "delWifi", "payload": {}}))["msg"] == "Required SSID to remove"
    assert (await client.command({"cmd": "delWifi", "payload": {"ssid": "q" * 20}}))["msg"] == (
        "SSID too long, max: 20")
    info = await client.command({"cmd": "info"})
    assert info["ssids"] == "[energywifi, n1, n2, n3]"


async def test_ntp_flag_is_inverted(client: RawClient, make_meter) -> None:  # type: ignore[no-untyped-def]
    """§3.7: success → error true + 'Time synced'; failure → error false + 'Error syncing time'."""
    ok = await client.command({"cmd": "ntp"})
    assert list(ok) == ["error", "cmd", "msg", "current_time"]
    assert ok["error"] is True and ok["msg"] == "Time synced"
    assert re.fullmatch(LONG_TIME, ok["current_time"])
    bg = await client.command({"cmd": "ntp", "payload": {"bg": True}})
    assert bg["error"] is True and bg["msg"] == "Time synced"
    lonely = await make_meter(ntp_port=9)  # nothing answers there
    c = await open_client(lonely.command_port)
    failed = await c.command({"cmd": "ntp"})
    assert failed["error"] is False and failed["msg"] == "Error syncing time"
    await c.close()


async def test_calibration(client: RawClient) -> None:
    """§3.8: texts, |value| in 0.5…2.0 (negative passes), %.2f message, shown in info."""
    assert (await client.command({"cmd": "calibration"}))["msg"] == "Missing cal constants"
    assert (await client.command({"cmd": "calibration", "cal": [1, 1]}))["msg"] == (
        "Need at least 6 cal constants")
    bad = await client.command({"cmd": "calibration", "cal": [1, 1, 2.5, 1, 1, 1]})
    assert bad["msg"] == "Calibration parameter 2: 2.50 not allowed [0.5-2.0]"
    ok = await client.command({"cmd": "calibration", "cal": [1.1, -0.9, 1, 1, 1, 2, 7]})
    assert ok == {"error": False, "cmd": "calibration",
                  "msg": "Calibration set: v1:1.10, i1:-0.90, v2:1.00, i2:1.00, v3:1.00, i3:2.00"}
    assert (await client.command({"cmd": "info"}))["calibration"] == [1.1, -0.9, 1, 1, 1, 2]


async def test_reset_and_get_energy(client: RawClient) -> None:
    """§3.9/§3.10: resetEnergy message; getEnergy keys, integer startTs, long-time start."""
    assert (await client.command({"cmd": "resetEnergy", "energy": [1, 2]}))["msg"] == (
        "Need 3 energy values")
    reply = await client.command({"cmd": "resetEnergy", "energy": [10, 20.5, 0], "ts": 1632219770})
    assert reply["error"] is False
    assert reply["msg"] == "Energy reset to [10.00, 20.50, 0.00], @09/21/2021 12:22:50.000"
    energy = await client.command({"cmd": "getEnergy"})
    assert list(energy) == ["error", "cmd", "energy", "unit", "startTs", "start", "days"]
    assert energy["unit"] == "Wh" and energy["startTs"] == 1632219770
    assert energy["start"] == "09/21/2021 12:22:50.000" and energy["days"] > 1000
    assert energy["energy"][0] >= 10 and energy["energy"][1] >= 20.5
    assert (await client.command({"cmd": "info"}))["energy"].startswith("[10.0000, 20.5000, ")


async def test_instantaneous_readings(client: RawClient, meter: EmulatedMeter) -> None:
    """§3.10: keys/units; apparentPower carries the reactive values; getPeriod is Hz."""
    power = await client.command({"cmd": "getPower"})
    assert list(power) == ["error", "cmd", "activePower", "reactivePower", "apparentPower", "unit"]
    assert power["apparentPower"] == power["reactivePower"] and power["unit"] == "W/var/VA"
    volts = await client.command({"cmd": "getVoltage"})
    assert list(volts) == ["error", "cmd", "voltage", "unit"] and volts["unit"] == "V"
    assert all(200 < v < 260 for v in volts["voltage"])
    current = await client.command({"cmd": "getCurrent"})
    assert current["unit"] == "mA" and len(current["current"]) == 3
    period = await client.command({"cmd": "getPeriod"})
    assert period["unit"] == "Hz" and all(49 < f < 51 for f in period["period"])
    phase = await client.command({"cmd": "getPhaseAngle"})
    assert phase["unit"] == "Deg" and len(phase["phase"]) == 3


async def test_get_log_and_clear_log(client: RawClient) -> None:
    """§3.11/§3.14: two lines, literal //n separators, boot row, Info:[W]/[E] rows; clearLog."""
    await client.send({"cmd": "fly"})  # a WARNING goes to flash
    await client.read_json()
    await client.send({"cmd": "getLog"})
    first = await client.wait_line(lambda x: x.startswith(b'Info:{"cmd":"log"'))
    second = await client.read_line()
    text = first.decode()
    assert text.startswith('Info:{"cmd":"log","msg":"*** LOGFile *** //n')
    assert text.endswith('//n*** LOGFile *** "}')
    rows = text[len('Info:{"cmd":"log","msg":"*** LOGFile *** //n'):-len('*** LOGFile *** "}')].split("//n")
    assert re.fullmatch(r"\d\d/\d\d \d\d:\d\d:\d\d: Reboot - inited SPIFFS Logger", rows[0])
    assert any(re.fullmatch(r"Info:\[W\]\d\d/\d\d \d\d:\d\d:\d\d: Received unknown command", r)
               for r in rows)
    assert second == b'Info:{"error":false,"cmd":"getLog"}'
    assert await client.command({"cmd": "clearLog"}) == {"error": False, "cmd": "clearLog"}
    await client.send({"cmd": "getLog"})
    first = await client.wait_line(lambda x: x.startswith(b'Info:{"cmd":"log"'))
    assert first == b'Info:{"cmd":"log","msg":"*** LOGFile *** //n*** LOGFile *** "}'


async def test_daily_restart(client: RawClient) -> None:
    """§3.12: both keys required, ranges, messages, persisted into info.dailyReset."""
    assert (await client.command({"cmd": "dailyRestart", "hour": 3}))["msg"] == "Missing hour/minute"
    assert (await client.command({"cmd": "dailyRestart", "hour": 24, "minute": 0}))["msg"] == (
        "Hour must be in 24h format, -1 to disable")
    assert (await client.command({"cmd": "dailyRestart", "hour": 2, "minute": 60}))["msg"] == (
        "Minute must be -1<min<60, -1 to disable")
    ok = await client.command({"cmd": "dailyRestart", "hour": 3, "minute": 5})
    assert ok == {"error": False, "cmd": "dailyRestart", "msg": "Set daily restart to: 03:05:00"}
    assert (await client.command({"cmd": "info"}))["dailyReset"] == "@03:05:00"
    off = await client.command({"cmd": "dailyRestart", "hour": -1, "minute": 0})
    assert off["msg"] == "Disabled daily restart"


async def test_ade9k_register_access(client: RawClient) -> None:
    """§3.13: errors incl. 'what'; read/write message format and key order."""
    assert (await client.command({"cmd": "ade9k"}))["msg"] == "Missing Register address"
    assert (await client.command({"cmd": "ade9k", "address": "0x10"}))["msg"] == (
        "Missing Size, 16 or 32 Bit")
    bad = await client.command({"cmd": "ade9k", "address": "10", "size": 16})
    assert bad == {"error": True, "cmd": "ade9k",
                   "msg": "Register values should be hex strings (e.g. 0xab)", "what": "10"}
    written = await client.command({"cmd": "ade9k", "address": "0x4b9", "size": 32, "write": "0x1234"})
    assert list(written) == ["error", "cmd", "newRegValue", "msg", "regValue"]
    assert written["newRegValue"] == 0x1234
    assert written["msg"] == "Addr: 0x04b9, Read: 0x0000, Write: 0x1234, Re-Read: 0x1234"
    read = await client.command({"cmd": "ade9k", "address": "0x4b9", "size": 16})
    assert read == {"error": False, "cmd": "ade9k", "msg": "Addr: 0x04b9, Read: 0x1234",
                    "regValue": 0x1234}


async def test_corrupted_cmd_echo_when_enabled(make_meter) -> None:  # type: ignore[no-untyped-def]
    """§2.9: with corrupt_cmd_echo the calibration reply's cmd is a fragment of the message."""
    meter = await make_meter(corrupt_cmd_echo=True)
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "calibration", "cal": [1, 1, 1, 1, 1, 1]})
    assert reply["cmd"] != "calibration" and reply["cmd"] in reply["msg"]
    await c.close()


async def test_restart_drops_connections_and_comes_back(make_meter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """§3.15/§10: no reply, connections die, same port after the boot delay, config persists."""
    state = tmp_path / "meter.json"
    meter = await make_meter(state_path=state)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "mqttServer", "payload": {"server": "broker"}})
    await c.send({"cmd": "restart"})
    assert await c.closed(timeout=2.0)
    assert not any(line.startswith(b"Info:{") for line in bytes(c.buffer).split(b"\r\n")
                   if b"restart" in line)
    port = meter.command_port
    await asyncio.sleep(0.3)
    c2 = await open_client(port)
    info = await c2.command({"cmd": "info"})
    assert info["mqtt_server"] == "broker" and meter.boot_count == 2
    assert json.loads(state.read_text())["mqtt_server"] == "broker"
    await c2.close()


@pytest.mark.parametrize(("cmd", "name_kept"), [("factoryReset", False), ("basicReset", True)])
async def test_factory_and_basic_reset(make_meter, cmd: str, name_kept: bool) -> None:  # type: ignore[no-untyped-def]
    """§3.15: defaults stored (basicReset keeps the name), energy-reset timestamp kept."""
    meter = await make_meter(name="keepme")
    c = await open_client(meter.command_port)
    await c.command({"cmd": "resetEnergy", "energy": [5, 5, 5], "ts": 1600000000})
    await c.command({"cmd": "streamServer", "payload": {"server": "10.0.0.9"}})
    await c.send({"cmd": cmd})
    assert await c.closed(timeout=2.0)
    await asyncio.sleep(0.3)
    c2 = await open_client(meter.command_port)
    info = await c2.command({"cmd": "info"})
    assert info["name"] == ("keepme" if name_kept else "smartmeterX")
    assert info["stream_server"] == "-" and info["time_server"] == "time.google.com"
    assert info["energy"] == "[0.0000, 0.0000, 0.0000]"
    assert meter.stored.energy_reset_ts == 1600000000
    await c2.close()


async def test_daily_restart_fires_when_local_time_matches(client: RawClient, meter: EmulatedMeter) -> None:
    """§3.12: the minute check restarts the meter at the stored local HH:MM ('Daily restart now!')."""
    import time as _time

    from smartmeter_ophyd.protocol import format_short_time

    if _time.time() % 60 > 56:
        await asyncio.sleep(4)
    hh, mm = format_short_time(_time.time())[-8:-3].split(":")
    meter.boot_true -= 61  # the first check after boot comes a minute later on the device
    await client.send({"cmd": "dailyRestart", "hour": int(hh), "minute": int(mm)})
    line = await client.wait_line(lambda x: b"Daily restart now!" in x)
    assert line.startswith(b"Info:[I]")
    assert await client.closed(timeout=2.0)
    await asyncio.sleep(0.3)
    assert meter.boot_count == 2
