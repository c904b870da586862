"""Reply views built from the verbatim lines of protocol.md, quirks included."""

from __future__ import annotations

import json

import pytest

from smartmeter_ophyd.protocol import LogLevel, Measures, RemoteProtocolError, Reply, Transport
from smartmeter_ophyd.protocol._commands import AddWifi, NtpSync, Sample
from smartmeter_ophyd.protocol._events import UnparsedReply
from smartmeter_ophyd.protocol._replies import (
    Ade9kReply,
    BusyReply,
    DeviceInfo,
    EnergyReading,
    ErrorReply,
    LineQuantity,
    LineValues,
    LogDump,
    LogLevelReply,
    MessageReply,
    NtpReply,
    PowerReading,
    SampleReply,
    StopReply,
    WifiOutcome,
    WifiReply,
    is_busy,
    parse_bracket_list,
    parse_log_dump,
    parse_reply,
    reply_succeeded,
)
from smartmeter_ophyd.protocol._timefmt import parse_long_time


def reply(line: str) -> Reply:
    """A Reply event from a verbatim ``Info:{...}`` line (as the decoder builds it)."""
    text = line.removeprefix("Info:").rstrip("\r\n")
    return Reply(json.loads(text), text)


INFO_LINE = (
    'Info:{"cmd":"info","type":"smartmeter","version":"2.2","compiled":"Nov  3 2021 18:09:15",'
    '"sys_time":"03/02/2021 10:37:07.662","name":"smartmeterX","ip":"192.168.0.138",'
    '"mqtt_server":"-","stream_server":"-","time_server":"time.google.com","sampling_rate":8000,'
    '"buffer_size":3670016,"psram":true,"rtc":true,"state":"idle",'
    '"energy":"[0.0000, 0.0000, 0.0000]","dailyReset":"None","calibration":[1,1,1,1,1,1],'
    '"ssids":"[]"}'
)


def test_info_line_of_appendix_b() -> None:
    info = parse_reply(reply(INFO_LINE), "info")
    assert isinstance(info, DeviceInfo)
    assert info.succeeded and info.is_smartmeter and not info.busy
    assert (info.version, info.name, info.ip) == ("2.2", "smartmeterX", "192.168.0.138")
    assert info.compiled == "Nov  3 2021 18:09:15"
    assert (info.mqtt_server, info.stream_server, info.time_server) == ("-", "-", "time.google.com")
    assert (info.sampling_rate, info.buffer_size, info.psram, info.rtc) == (
        8000,
        3670016,
        True,
        True,
    )
    assert info.energy == (0.0, 0.0, 0.0)
    assert info.daily_reset == "None" and info.daily_restart is None
    assert info.calibration == (1.0,) * 6
    assert info.ssids == ()
    assert info.sys_time_unix(dst_known=False) == parse_long_time("03/02/2021 10:37:07.662", False)
    assert list(info.raw_fields)[:3] == ["cmd", "type", "version"]
    assert reply_succeeded("info", reply(INFO_LINE))


def test_info_tolerates_missing_extra_keys_and_readme_shape() -> None:
    # README (seed) shape: other type spelling, WiFi keys, no energy/dailyReset
    line = (
        'Info:{"cmd":"info","type":"SmartMeter","version":"2.2","name":"m","state":"busy",'
        '"calibration":[1,1],"ssids":"[energywifi, Test, ]","ssid":"-","rssi":-71,'
        '"energy":"[12.5000, 0.2500, 3.0000]","dailyReset":"@03:30:00"}'
    )
    info = parse_reply(reply(line), "info")
    assert isinstance(info, DeviceInfo)
    assert info.is_smartmeter and info.busy
    assert info.ip is None and info.sampling_rate is None and info.sys_time_unix() is None
    assert info.ssids == ("energywifi", "Test")
    assert info.energy == (12.5, 0.25, 3.0)
    assert info.daily_restart == (3, 30)
    assert info.raw_fields["rssi"] == -71
    # an info line with state busy is not a busy *refusal*
    assert not is_busy(reply(line))


SAMPLE_LINE = (
    'Info:{"error":false,"cmd":"sample","measures":"v,i,v,i,v,i","chunksize":1008,'
    '"samplingrate":8000,"conn_type":"TCP","measurements":6,"prefix":true,"flowCtr":false,'
    '"unit":"V,mA,V,mA,V,mA","startTs":"1614697441.119"}'
)


def test_sample_reply_of_section_4_4() -> None:
    view = parse_reply(reply(SAMPLE_LINE), "sample")
    assert isinstance(view, SampleReply)
    assert view.succeeded
    assert view.measures is Measures.VI
    assert (view.chunk_size, view.sampling_rate, view.measurements) == (1008, 8000, 6)
    assert view.transport is Transport.TCP
    assert (view.prefix, view.flow_control) == (True, False)
    assert view.units == ("V", "mA", "V", "mA", "V", "mA")
    assert view.start_ts == pytest.approx(1614697441.119)
    assert view.scheduled is None and view.port is None and view.slot is None
    assert reply_succeeded(Sample, reply(SAMPLE_LINE))


def test_sample_reply_udp_slot_latched_and_unsynced_clock() -> None:
    line = (
        'Info:{"error":false,"cmd":"sample","port":54323,"slot":[1,3],"measures":"p,p,p,q,q,q",'
        '"chunksize":504,"samplingrate":50,"conn_type":"UDP","measurements":6,"prefix":true,'
        '"flowCtr":false,"unit":"W,W,W,VAR,VAR,VAR","startTs":"0.000"}'
    )
    view = parse_reply(reply(line), "sample")
    assert isinstance(view, SampleReply)
    assert view.measures is Measures.PQ and view.transport is Transport.UDP
    assert (view.port, view.slot) == (54323, (1, 3))
    assert view.start_ts == 0.0  # kept: before NTP the firmware reports 0.000 (§6.1)


def test_scheduled_sample_accepted_and_refused() -> None:
    accepted = (
        'Info:{"error":false,"cmd":"sample","measures":"v,i_L1","chunksize":512,'
        '"samplingrate":4000,"conn_type":"TCP","measurements":2,"prefix":true,"flowCtr":false,'
        '"unit":"V,mA","startTs":"1614677830.000",'
        '"msg":"Should sample at: 03/02/2021 10:37:10.000//nStart sampling in: 1503ms"}'
    )
    view = parse_reply(reply(accepted), "sample")
    assert isinstance(view, SampleReply) and view.succeeded
    assert view.measures is Measures.VI_L1
    assert view.scheduled is not None and view.scheduled.accepted
    assert view.scheduled.delay_ms == 1503
    assert view.scheduled.should_sample_at == "03/02/2021 10:37:10.000"
    assert view.start_ts == 1614677830.0

    refused = (
        'Info:{"error":true,"cmd":"sample","measures":"v,i_L1","chunksize":512,'
        '"samplingrate":4000,"conn_type":"TCP","measurements":2,"prefix":true,"flowCtr":false,'
        '"unit":"V,mA",'
        '"msg":"Should sample at: 03/02/2021 10:37:10.000//nCannot start sampling in: 4294966796ms"}'
    )
    view = parse_reply(reply(refused), "sample")
    assert isinstance(view, SampleReply) and not view.succeeded
    assert view.scheduled is not None and not view.scheduled.accepted
    assert view.scheduled.delay_ms == 4294966796
    assert view.start_ts is None


def test_sample_validation_error_and_bad_shapes() -> None:
    error = parse_reply(
        reply('Info:{"error":true,"cmd":"sample","msg":"SamplingRate could not be set to 3"}'),
        "sample",
    )
    assert isinstance(error, ErrorReply) and not error.succeeded
    assert error.message == "SamplingRate could not be set to 3"
    with pytest.raises(RemoteProtocolError, match="measures"):
        parse_reply(reply('Info:{"error":false,"cmd":"sample","chunksize":1008}'), "sample")
    with pytest.raises(RemoteProtocolError, match="unknown measures"):
        parse_reply(
            reply(
                'Info:{"error":false,"cmd":"sample","measures":"x","chunksize":8,"samplingrate":1}'
            ),
            "sample",
        )
    with pytest.raises(RemoteProtocolError, match="chunk"):
        parse_reply(reply('Info:{"error":false,"cmd":"sample","measures":"v,i_L1"}'), "sample")


def test_stop_reply_of_section_4_8_and_idle_form() -> None:
    line = (
        'Info:{"msg":"Received stop command","sample_duration":16157,"samples":16,'
        '"sent_samples":16,"start_ts":"1614697441.119","stop_ts":"1614697457.276",'
        '"ip":"192.168.0.138","avg_rate":0.955618,"cmd":"stop","error":false}'
    )
    view = parse_reply(reply(line), "stop")
    assert isinstance(view, StopReply) and view.succeeded and not view.was_idle
    assert (view.sample_duration_ms, view.samples, view.sent_samples) == (16157, 16, 16)
    assert view.start_ts == pytest.approx(1614697441.119)
    assert view.stop_ts == pytest.approx(1614697457.276)
    assert view.ip == "192.168.0.138" and view.avg_rate == pytest.approx(0.955618)
    assert view.message == "Received stop command"

    idle = parse_reply(reply('Info:{"error":true,"cmd":"stop"}'), "stop")
    assert isinstance(idle, StopReply) and not idle.succeeded and idle.was_idle
    assert idle.samples is None and idle.stop_ts is None


def test_get_energy_of_section_3_10() -> None:
    line = (
        'Info:{"error":false,"cmd":"getEnergy","energy":[10149.5684,5101.23238,4509.21022],'
        '"unit":"Wh","startTs":1632219770,"start":"09/20/2021 12:22:50.068","days":1}'
    )
    view = parse_reply(reply(line), "getEnergy")
    assert isinstance(view, EnergyReading)
    assert view.energy == (10149.5684, 5101.23238, 4509.21022)
    assert (view.unit, view.start_ts, view.start, view.days) == (
        "Wh",
        1632219770,
        "09/20/2021 12:22:50.068",
        1,
    )


@pytest.mark.parametrize(
    ("cmd", "key", "unit", "quantity"),
    [
        ("getVoltage", "voltage", "V", LineQuantity.VOLTAGE),
        ("getCurrent", "current", "mA", LineQuantity.CURRENT),
        ("getPeriod", "period", "Hz", LineQuantity.FREQUENCY),
        ("getPhaseAngle", "phase", "Deg", LineQuantity.PHASE_ANGLE),
    ],
)
def test_line_readings(cmd: str, key: str, unit: str, quantity: LineQuantity) -> None:
    line = f'Info:{{"error":false,"cmd":"{cmd}","{key}":[49.98,50.01,50],"unit":"{unit}"}}'
    view = parse_reply(reply(line), cmd)
    assert isinstance(view, LineValues)
    assert view.quantity is quantity and view.unit == unit
    assert (view.l1, view.l2, view.l3) == (49.98, 50.01, 50.0)
    with pytest.raises(RemoteProtocolError, match="3 numbers"):
        parse_reply(reply(f'Info:{{"error":false,"cmd":"{cmd}","{key}":[1,2]}}'), cmd)


def test_get_power_passes_apparent_through() -> None:
    line = (
        'Info:{"error":false,"cmd":"getPower","activePower":[100.5,0,-3],'
        '"reactivePower":[10,20,30],"apparentPower":[10,20,30],"unit":"W/var/VA"}'
    )
    view = parse_reply(reply(line), "getPower")
    assert isinstance(view, PowerReading)
    assert view.active == (100.5, 0.0, -3.0)
    assert view.reactive == view.apparent == (10.0, 20.0, 30.0)
    assert view.unit == "W/var/VA"


def test_ntp_inverted_flag() -> None:
    synced = reply(
        'Info:{"error":true,"cmd":"ntp","msg":"Time synced","current_time":"03/02/2021 11:27:40.182"}'
    )
    failed = reply(
        'Info:{"error":false,"cmd":"ntp","msg":"Error syncing time","current_time":"03/02/2021 11:27:40.182"}'
    )
    view = parse_reply(synced, "ntp")
    assert isinstance(view, NtpReply) and view.succeeded
    assert view.current_time == "03/02/2021 11:27:40.182"
    assert reply_succeeded("ntp", synced) and reply_succeeded(NtpSync, synced)
    assert not parse_reply(failed, "ntp").succeeded
    assert not reply_succeeded(NtpSync, failed)


def test_add_wifi_inverted_flag_and_trailing_comma() -> None:
    added = reply(
        'Info:{"error":true,"cmd":"addWifi","ssid":"Test","pwd":"pw",'
        '"msg":"New Ap, SSID: Test, PW: pw","ssids":"[energywifi, Test, ]"}'
    )
    view = parse_reply(added, "addWifi")
    assert isinstance(view, WifiReply) and view.succeeded
    assert view.outcome is WifiOutcome.ADDED
    assert view.ssids == ("energywifi", "Test")
    assert (view.ssid, view.pwd) == ("Test", "pw")
    assert reply_succeeded(AddWifi, added)

    duplicate = reply(
        'Info:{"error":true,"cmd":"addWifi","msg":"Wifi AP Test already in list",'
        '"ssids":"[energywifi, Test, ]"}'
    )
    assert parse_reply(duplicate, "addWifi").succeeded
    full = reply(
        'Info:{"error":false,"cmd":"addWifi","msg":"MAX # APs reached, need to delete first",'
        '"ssids":"[a, b, c, d, e, ]"}'
    )
    full_view = parse_reply(full, "addWifi")
    assert isinstance(full_view, WifiReply) and not full_view.succeeded
    assert full_view.outcome is WifiOutcome.FULL and len(full_view.ssids) == 5
    assert not reply_succeeded("addWifi", full)


def test_del_wifi_outcomes() -> None:
    removed = parse_reply(
        reply(
            'Info:{"error":false,"cmd":"delWifi","msg":"Removed SSID: Test",'
            '"ssids":"[energywifi, ]"}'
        ),
        "delWifi",
    )
    assert isinstance(removed, WifiReply) and removed.succeeded
    assert removed.outcome is WifiOutcome.REMOVED and removed.ssids == ("energywifi",)
    missing = parse_reply(
        reply('Info:{"error":true,"cmd":"delWifi","msg":"SSID x not found","ssids":"[]"}'),
        "delWifi",
    )
    assert isinstance(missing, WifiReply) and not missing.succeeded
    assert missing.outcome is WifiOutcome.NOT_FOUND


def test_busy_reply_of_section_2_8() -> None:
    line = (
        'Info:{"error":true,"cmd":"getVoltage",'
        '"msg":"Device with IP: 192.168.0.138 currently sampling","state":"busy"}'
    )
    assert is_busy(reply(line))
    view = parse_reply(reply(line), "getVoltage")
    assert isinstance(view, BusyReply) and not view.succeeded
    assert view.device_ip == "192.168.0.138"
    assert not reply_succeeded("getVoltage", reply(line))
    plain = parse_reply(
        reply('Info:{"error":true,"cmd":"mdns","msg":"Currently sampling","state":"busy"}'),
        "mdns",
    )
    assert isinstance(plain, BusyReply) and plain.device_ip is None


def test_cts_replies_incl_error_message_starting_with_info() -> None:
    ok = parse_reply(reply('Info:{"error":false,"cmd":"cts"}'), "cts")
    assert isinstance(ok, MessageReply) and ok.succeeded and ok.message is None
    error = parse_reply(
        reply('Info:{"error":true,"cmd":"cts","msg":"Info:Not a valid \\"cts\\" command"}'), "cts"
    )
    assert isinstance(error, ErrorReply) and not error.succeeded
    assert error.message == 'Info:Not a valid "cts" command'


def test_log_level_reply() -> None:
    view = parse_reply(
        reply('Info:{"error":false,"cmd":"log","msg":"Log Level set to: warning"}'), "log"
    )
    assert isinstance(view, LogLevelReply) and view.level is LogLevel.WARNING
    bad = parse_reply(
        reply('Info:{"error":true,"cmd":"log","msg":"Unknown log level: loud"}'), "log"
    )
    assert isinstance(bad, LogLevelReply) and not bad.succeeded and bad.level is None


def test_setting_replies_echo_value() -> None:
    view = parse_reply(
        reply(
            'Info:{"error":false,"cmd":"mqttServer","msg":"Set MQTTServer address to: 10.0.0.1",'
            '"mqtt_server":"10.0.0.1"}'
        ),
        "mqttServer",
    )
    assert isinstance(view, MessageReply) and view.value == "10.0.0.1"


def test_garbled_cmd_echo_tolerated_only_where_documented() -> None:
    garbled = reply(
        'Info:{"error":false,"cmd":"ration set: v1:1.00","msg":"Calibration set: v1:1.00, '
        'i1:1.00, v2:1.00, i2:1.00, v3:1.00, i3:1.00"}'
    )
    view = parse_reply(garbled, "calibration")
    assert isinstance(view, MessageReply) and view.succeeded
    assert view.cmd == "ration set: v1:1.00"
    ade = parse_reply(
        reply(
            'Info:{"error":false,"cmd":"Addr: 0x","msg":"Addr: 0x04a0, Read: 0x0001","regValue":1}'
        ),
        "ade9k",
    )
    assert isinstance(ade, Ade9kReply) and ade.reg_value == 1 and ade.new_reg_value is None
    with pytest.raises(RemoteProtocolError, match="'getVoltage'.*'getCurrent'"):
        parse_reply(
            reply('Info:{"error":false,"cmd":"getCurrent","current":[1,2,3],"unit":"mA"}'),
            "getVoltage",
        )


def test_unknown_command_reply_is_an_error() -> None:
    view = parse_reply(reply('Info:{"error":true,"cmd":"foo","msg":"unknown command"}'), "foo")
    assert isinstance(view, ErrorReply) and view.message == "unknown command"


LOG_DUMP = (
    'Info:{"cmd":"log","msg":"*** LOGFile *** //n'
    "03/02 10:36:59: Reboot - inited SPIFFS Logger//n"
    "Info:[E]03/02 11:26:20: deserializeJson() failed: __cmd_:oops_//n"
    'Info:[W]03/02 11:27:01: said "hi"//n'
    '*** LOGFile *** "}'
)


def test_get_log_first_line_unparsed() -> None:
    rows = parse_log_dump(UnparsedReply(LOG_DUMP.removeprefix("Info:")))
    assert rows == [
        "03/02 10:36:59: Reboot - inited SPIFFS Logger",
        "Info:[E]03/02 11:26:20: deserializeJson() failed: __cmd_:oops_",
        'Info:[W]03/02 11:27:01: said "hi"',
    ]
    assert parse_log_dump(LOG_DUMP + "\r\n") == rows


def test_get_log_first_line_valid_json_and_second_line() -> None:
    first = reply(
        'Info:{"cmd":"log","msg":"*** LOGFile *** //nInfo:[W]03/02 11:26:20: Cannot connect'
        ' to MQTT Server -//n*** LOGFile *** "}'
    )
    view = parse_reply(first, "getLog")
    assert isinstance(view, LogDump)
    assert view.rows == ("Info:[W]03/02 11:26:20: Cannot connect to MQTT Server -",)
    assert parse_log_dump(first) == list(view.rows)
    second = parse_reply(reply('Info:{"error":false,"cmd":"MQTT Server -"}'), "getLog")
    assert isinstance(second, MessageReply) and second.succeeded


def test_empty_log_dump_and_not_a_dump() -> None:
    assert parse_log_dump('{"cmd":"log","msg":"*** LOGFile *** //n*** LOGFile *** "}') == []
    with pytest.raises(RemoteProtocolError, match="getLog"):
        parse_log_dump('{"cmd":"log","msg":"Log Level set to: info"}')
    with pytest.raises(RemoteProtocolError, match="getLog"):
        parse_log_dump("Setup done")


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("[]", []),
        ("[a]", ["a"]),
        ("[a, b]", ["a", "b"]),
        ("[energywifi, Test, ]", ["energywifi", "Test"]),
    ],
)
def test_bracket_lists(text: str, items: list[str]) -> None:
    assert parse_bracket_list(text) == items


def test_wifi_password_stays_out_of_reprs() -> None:
    """Issue #3: WiFi passwords never appear in logs or repr (the firmware echoes them, §3.6)."""
    command = AddWifi("lab", "hunter2")
    assert "hunter2" not in repr(command) and b"hunter2" in command.encode()
    line = ('{"error":true,"cmd":"addWifi","ssid":"lab","pwd":"hunter2",'
            '"msg":"New Ap, SSID: lab, PW: hunter2","ssids":"[lab, ]"}')
    view = parse_reply(Reply(json.loads(line), line), "addWifi")
    assert view.succeeded and "hunter2" not in repr(view)
    assert view.message == "New Ap, SSID: lab, PW: ***"
