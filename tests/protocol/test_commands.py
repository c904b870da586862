"""Commands: exact wire bytes, key placement (§3), and every client-side validation rule."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartmeter_ophyd.protocol import ACCEPTED_RATES, CommandError, LogLevel, Measures, Transport
from smartmeter_ophyd.protocol._commands import (
    COMMANDS,
    KEEPALIVE,
    PROBE,
    AddWifi,
    Ade9kAccess,
    BasicReset,
    ClearLog,
    Command,
    Cts,
    DelWifi,
    FactoryReset,
    GetEnergy,
    GetLog,
    GetPeriod,
    GetPower,
    Info,
    NtpSync,
    RequestSamples,
    ResetEnergy,
    Restart,
    Sample,
    SetCalibration,
    SetDailyRestart,
    SetLogLevel,
    SetMqttServer,
    SetName,
    SetStreamServer,
    SetTimeServer,
    Stop,
    check_start_window,
)
from smartmeter_ophyd.protocol._wire import JsonInput, parse_input_line

# ----------------------------------------------------------------- exact bytes (§3, App. B)


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        # Appendix B
        (Sample(rate=4000), b'{"cmd":"sample","payload":{"type":"TCP","rate":4000}}\n'),
        (Stop(), b'{"cmd":"stop"}\n'),
        # README / §3 examples
        (Info(), b'{"cmd":"info"}\n'),
        (SetLogLevel(LogLevel.WARNING), b'{"cmd":"log","level":"warning"}\n'),
        (SetName("lab-1"), b'{"cmd":"mdns","payload":{"name":"lab-1"}}\n'),
        (Restart(), b'{"cmd":"restart"}\n'),
        (FactoryReset(), b'{"cmd":"factoryReset"}\n'),
        (BasicReset(), b'{"cmd":"basicReset"}\n'),
        (GetLog(), b'{"cmd":"getLog"}\n'),
        (ClearLog(), b'{"cmd":"clearLog"}\n'),
        (
            SetCalibration((1, 1, 1, 1, 1, 1)),
            b'{"cmd":"calibration","cal":[1.0,1.0,1.0,1.0,1.0,1.0]}\n',
        ),
        (ResetEnergy(), b'{"cmd":"resetEnergy"}\n'),
        (
            ResetEnergy((1.5, 2, 3), ts=1614677828),
            b'{"cmd":"resetEnergy","energy":[1.5,2.0,3.0],"ts":1614677828}\n',
        ),
        (NtpSync(), b'{"cmd":"ntp"}\n'),
        (NtpSync(background=True), b'{"cmd":"ntp","payload":{"bg":true}}\n'),
        (
            SetTimeServer("time.google.com"),
            b'{"cmd":"timeServer","payload":{"server":"time.google.com"}}\n',
        ),
        (
            AddWifi("energywifi", "secret"),
            b'{"cmd":"addWifi","payload":{"ssid":"energywifi","pwd":"secret"}}\n',
        ),
        (AddWifi("open"), b'{"cmd":"addWifi","payload":{"ssid":"open","pwd":""}}\n'),
        (DelWifi("Test"), b'{"cmd":"delWifi","payload":{"ssid":"Test"}}\n'),
        (SetMqttServer("-"), b'{"cmd":"mqttServer","payload":{"server":"-"}}\n'),
        (
            SetStreamServer("192.168.0.13"),
            b'{"cmd":"streamServer","payload":{"server":"192.168.0.13"}}\n',
        ),
        (RequestSamples(42, Measures.VI), b'{"cmd":"reqSamples","samples":42}\n'),
        (Cts(True), b'{"cmd":"cts","value":true}\n'),
        (Cts(False), b'{"cmd":"cts","value":false}\n'),
        (GetPower(), b'{"cmd":"getPower"}\n'),
        (GetEnergy(), b'{"cmd":"getEnergy"}\n'),
        (GetPeriod(), b'{"cmd":"getPeriod"}\n'),
        (SetDailyRestart(3, 30), b'{"cmd":"dailyRestart","hour":3,"minute":30}\n'),
        (SetDailyRestart.disabled(), b'{"cmd":"dailyRestart","hour":-1,"minute":-1}\n'),
        (
            Ade9kAccess(0x4A0, 16),
            b'{"cmd":"ade9k","address":"0x4a0","size":16}\n',
        ),
        (
            Ade9kAccess(0x4A0, 32, write=0xABCDEF01),
            b'{"cmd":"ade9k","address":"0x4a0","size":32,"write":"0xabcdef01"}\n',
        ),
    ],
    ids=lambda value: value.name if isinstance(value, Command) else "",
)
def test_exact_wire_bytes(command: Command, wire: bytes) -> None:
    assert command.encode() == wire


def test_sample_full_payload_in_table_order() -> None:
    command = Sample(
        transport=Transport.UDP,
        rate=50,
        measures=Measures.PQ,
        prefix=False,
        port=54323,
        flow_control=True,
    )
    assert command.encode() == (
        b'{"cmd":"sample","payload":{"type":"UDP","rate":50,"measures":"p,q",'
        b'"prefix":false,"port":54323,"flowCtr":true}}\n'
    )
    scheduled = Sample(rate=8000, measures=Measures.VI_L2, slot=(1, 3), start_time=1614677830)
    assert scheduled.encode() == (
        b'{"cmd":"sample","payload":{"type":"TCP","rate":8000,"measures":"v,i_L2",'
        b'"slot":[1,3],"time":1614677830}}\n'
    )


def test_sample_never_sends_ntpconf_nor_default_measures() -> None:
    payload = Sample().to_json()["payload"]
    assert "ntpConf" not in payload
    assert "measures" not in payload
    assert payload == {"type": "TCP", "rate": 8000}


def test_special_lines() -> None:
    assert PROBE == b"?\n"
    assert KEEPALIVE == b"!\n"


def test_string_arguments_are_coerced() -> None:
    assert Sample(transport="Serial", measures="v,i").measures is Measures.VI_L1  # type: ignore[arg-type]
    assert Sample(transport="Serial").transport is Transport.SERIAL  # type: ignore[arg-type]
    assert SetLogLevel("debug").level is LogLevel.DEBUG  # type: ignore[arg-type]


# ------------------------------------------------------------------- registry round trip

SAMPLE_ARGS: dict[str, dict[str, Any]] = {
    "sample": {"rate": 1000},
    "cts": {"value": True},
    "reqSamples": {"samples": 20, "measures": Measures.VI_L1},
    "log": {"level": LogLevel.INFO},
    "mdns": {"device_name": "meter"},
    "mqttServer": {"server": "10.0.0.1"},
    "streamServer": {"server": "10.0.0.2"},
    "timeServer": {"server": "pool.ntp.org"},
    "addWifi": {"ssid": "a", "pwd": "b"},
    "delWifi": {"ssid": "a"},
    "ntp": {"background": True},
    "calibration": {"factors": (1.0, 0.9, 1.1, 1.0, -1.0, 2.0)},
    "resetEnergy": {"energy": (0.0, 0.0, 0.0), "ts": 1},
    "dailyRestart": {"hour": 0, "minute": 0},
    "ade9k": {"address": 0x4A0, "size": 32, "write": 1},
}
PAYLOAD_KEYS = {
    "sample": {"type", "rate"},
    "mdns": {"name"},
    "mqttServer": {"server"},
    "streamServer": {"server"},
    "timeServer": {"server"},
    "addWifi": {"ssid", "pwd"},
    "delWifi": {"ssid"},
    "ntp": {"bg"},
}
TOP_LEVEL_KEYS = {
    "cts": {"value"},
    "reqSamples": {"samples"},
    "log": {"level"},
    "calibration": {"cal"},
    "resetEnergy": {"energy", "ts"},
    "dailyRestart": {"hour", "minute"},
    "ade9k": {"address", "size", "write"},
}


def test_registry_has_all_28_wire_names() -> None:
    assert len(COMMANDS) == 28
    for name, cls in COMMANDS.items():
        assert cls.name == name
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_registry_round_trip(name: str) -> None:
    cls = COMMANDS[name]
    command = cls(**SAMPLE_ARGS.get(name, {}))
    wire = command.encode()
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    obj = json.loads(wire)
    assert next(iter(obj)) == "cmd" and obj["cmd"] == name
    top = set(obj) - {"cmd", "payload"}
    assert top == TOP_LEVEL_KEYS.get(name, set())
    assert set(obj.get("payload", {})) == PAYLOAD_KEYS.get(name, set())
    # the firmware's own view of the line (server-role parser) sees the same command
    parsed = parse_input_line(wire[:-1])
    assert isinstance(parsed, JsonInput) and parsed.cmd == name
    assert not hasattr(command, "__dict__")
    for field in dataclasses.fields(command):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(command, field.name, getattr(command, field.name))


def test_reply_expectations_are_data() -> None:
    silent = {n for n, c in COMMANDS.items() if not c.expects_reply}
    assert silent == {"info", "reqSamples", "restart", "factoryReset", "basicReset"}
    unchecked = {n for n, c in COMMANDS.items() if not c.busy_checked}
    assert unchecked == {
        "stop",
        "cts",
        "reqSamples",
        "info",
        "log",
        "ntp",
        "restart",
        "factoryReset",
        "basicReset",
    }
    garbled = {n for n, c in COMMANDS.items() if not c.reply_cmd_reliable}
    assert garbled == {"calibration", "dailyRestart", "ade9k", "getLog"}
    inverted = {n for n, c in COMMANDS.items() if c.error_inverted}
    assert inverted == {"ntp", "addWifi"}
    assert {n for n, c in COMMANDS.items() if c.reboots} == {
        "restart",
        "factoryReset",
        "basicReset",
    }
    assert GetLog.lines_before_reply == 1


# ------------------------------------------------------------------------ validation


def assert_rejected(factory: Any, *needles: str) -> CommandError:
    with pytest.raises(CommandError) as info:
        factory()
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return info.value


@given(st.integers(min_value=-100_000, max_value=100_000).filter(lambda r: r not in ACCEPTED_RATES))
def test_any_rate_outside_accepted_rates_is_rejected(rate: int) -> None:
    assert_rejected(lambda: Sample(rate=rate), "rate", str(rate))


@given(st.sampled_from(ACCEPTED_RATES))
def test_every_accepted_rate_encodes(rate: int) -> None:
    assert json.loads(Sample(rate=rate).encode())["payload"]["rate"] == rate


@pytest.mark.parametrize("measures", [Measures.PQ, Measures.VI_RMS])
def test_latched_rate_limit(measures: Measures) -> None:
    assert Sample(rate=50, measures=measures).rate == 50
    assert Sample(rate=7, measures=measures).rate == 7
    assert_rejected(lambda: Sample(rate=51, measures=measures), "rate", "51", "50")


def test_rate_must_be_int() -> None:
    assert_rejected(lambda: Sample(rate=8000.0), "rate", "integer")  # type: ignore[arg-type]
    assert_rejected(lambda: Sample(rate=True), "rate")


def test_ffmpeg_is_rejected_with_pointer_to_raw_stream() -> None:
    assert_rejected(lambda: Sample(transport=Transport.FFMPEG), "transport", "FFMPEG", "54322")


def test_unknown_transport_and_measures() -> None:
    assert_rejected(lambda: Sample(transport="tcp"), "transport", "'tcp'", "'TCP'")  # type: ignore[arg-type]
    assert_rejected(
        lambda: Sample(measures="p,p,p,q,q,q"),  # type: ignore[arg-type]
        "measures",
        "'p,p,p,q,q,q'",
        "PQ",
    )


def test_mqtt_transport_allowed() -> None:
    assert Sample(transport=Transport.MQTT, rate=1).to_json()["payload"]["type"] == "MQTT"


def test_udp_port_rules() -> None:
    assert Sample(transport=Transport.UDP, port=1).port == 1
    assert Sample(transport=Transport.UDP, port=65535).port == 65535
    assert_rejected(lambda: Sample(transport=Transport.UDP), "port", "1..65535")
    assert_rejected(lambda: Sample(transport=Transport.UDP, port=0), "port", "0", "1..65535")
    assert_rejected(
        lambda: Sample(transport=Transport.UDP, port=65536), "port", "65536", "1..65535"
    )
    assert_rejected(lambda: Sample(port=54323), "port", "54323", "only used with UDP")


def test_bool_flags_must_be_real_booleans() -> None:
    assert_rejected(lambda: Sample(prefix="false"), "prefix", "'false'", "True or False")  # type: ignore[arg-type]
    assert_rejected(lambda: Sample(flow_control=1), "flow_control", "True or False")  # type: ignore[arg-type]
    assert_rejected(lambda: Cts("false"), "value", "True or False")  # type: ignore[arg-type]
    assert_rejected(lambda: NtpSync(background=1), "background", "True or False")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("slot", "needle"),
    [((0, 0), "slots >= 1"), ((3, 3), "0 <= slot < slots"), ((-1, 2), "0 <= slot"), ((1,), "pair")],
)
def test_slot_rules(slot: Any, needle: str) -> None:
    assert_rejected(lambda: Sample(slot=slot), "slot", needle)


def test_slot_with_udp_or_mqtt_is_rejected() -> None:
    assert Sample(transport=Transport.SERIAL, slot=(0, 1)).slot == (0, 1)
    for transport, extra in ((Transport.UDP, {"port": 5000}), (Transport.MQTT, {})):
        assert_rejected(
            lambda t=transport, e=extra: Sample(transport=t, slot=(0, 2), **e),
            "slot",
            "TCP or Serial",
        )


def test_start_time_rules() -> None:
    assert_rejected(lambda: Sample(start_time=1614677830.5), "start_time", "integer")  # type: ignore[arg-type]
    assert_rejected(lambda: Sample(start_time=0), "start_time", "positive integer")
    assert_rejected(
        lambda: Sample(rate=10, measures=Measures.PQ, start_time=1614677830),
        "start_time",
        "latched",
    )


@pytest.mark.parametrize("lead", [0.6, 1.0, 20.0])
def test_start_window_accepts(lead: float) -> None:
    check_start_window(1000.0 + lead, now=1000.0)


@pytest.mark.parametrize("lead", [-5.0, 0.0, 0.5, 20.01, 3600.0])
def test_start_window_rejects(lead: float) -> None:
    err = assert_rejected(
        lambda: check_start_window(1000.0 + lead, now=1000.0), "start_time", "20 s", ">= 1 s"
    )
    assert f"{lead:.3f}" in str(err)


def test_request_samples_limits() -> None:
    assert RequestSamples(11, Measures.VI).samples == 11
    assert RequestSamples(128, Measures.VI_L3).samples == 128
    assert_rejected(lambda: RequestSamples(10, Measures.VI), "samples", "10", "11..42")
    assert_rejected(
        lambda: RequestSamples(43, Measures.VI), "samples", "43", "11..42", "send buffer"
    )
    assert_rejected(lambda: RequestSamples(129, Measures.VI_L1), "samples", "129", "11..128")
    assert_rejected(lambda: RequestSamples(20, Measures.PQ), "measures", "latched")


def test_log_level_rejects_unknown() -> None:
    assert_rejected(lambda: SetLogLevel("verbose"), "level", "'verbose'", "warning")  # type: ignore[arg-type]


def test_name_rules() -> None:
    assert SetName("x" * 19).device_name == "x" * 19
    assert_rejected(lambda: SetName("x" * 20), "name", "1..19", "overflow")
    assert_rejected(lambda: SetName(""), "name", "1..19")
    assert_rejected(lambda: SetName("100%"), "name", "'100%'", "'%'")
    assert_rejected(lambda: SetName("a\nb"), "name", "control")


def test_server_rules() -> None:
    assert SetMqttServer("x" * 16).server == "x" * 16
    assert_rejected(lambda: SetMqttServer("x" * 17), "server", "1..16")
    assert_rejected(lambda: SetStreamServer("x" * 17), "server", "1..16")
    assert SetTimeServer("x" * 24).server == "x" * 24
    assert_rejected(lambda: SetTimeServer("x" * 25), "server", "1..24")
    assert_rejected(lambda: SetTimeServer("a%s"), "server", "'%'")


def test_wifi_rules() -> None:
    assert AddWifi("s" * 19, "p" * 19).ssid == "s" * 19
    assert_rejected(lambda: AddWifi("s" * 20, "p"), "ssid", "1..19")
    assert_rejected(lambda: AddWifi("s", "p" * 20), "pwd", "0..19")
    assert_rejected(lambda: AddWifi("-", "p"), "ssid", "'-'")
    assert_rejected(lambda: DelWifi("s" * 20), "ssid", "1..19")
    assert_rejected(lambda: DelWifi("-"), "ssid", "'-'", "corrupt")
    assert_rejected(lambda: DelWifi(""), "ssid", "1..19")


def test_calibration_rules() -> None:
    assert SetCalibration((0.5, -0.5, 2.0, -2.0, 1, 1)).factors == (0.5, -0.5, 2.0, -2.0, 1.0, 1.0)
    assert_rejected(lambda: SetCalibration((1, 1, 1, 1, 1, 2.01)), "factors[5]", "2.01", "0.5..2.0")
    assert_rejected(lambda: SetCalibration((1, 1, 0.49, 1, 1, 1)), "factors[2]", "0.5..2.0")
    assert_rejected(lambda: SetCalibration((1, 1, 1, 1, 1, math.nan)), "factors[5]", "finite")
    assert_rejected(lambda: SetCalibration((1, 1, 1)), "factors", "exactly 6")  # type: ignore[arg-type]


def test_reset_energy_rules() -> None:
    assert_rejected(lambda: ResetEnergy((1.0, 2.0)), "energy", "exactly 3")  # type: ignore[arg-type]
    assert_rejected(lambda: ResetEnergy((1.0, 2.0, math.inf)), "energy[2]", "finite")
    assert_rejected(lambda: ResetEnergy(ts=-1), "ts", "non-negative integer")
    assert_rejected(lambda: ResetEnergy(ts=1.5), "ts", "integer")  # type: ignore[arg-type]


def test_daily_restart_rules() -> None:
    assert_rejected(lambda: SetDailyRestart(24, 0), "hour", "24", "-1..23")
    assert_rejected(lambda: SetDailyRestart(-2, 0), "hour", "-1..23")
    assert_rejected(lambda: SetDailyRestart(1, 60), "minute", "60", "-1..59")
    assert_rejected(lambda: SetDailyRestart(1, -1), "minute", "never fire")


def test_ade9k_rules() -> None:
    assert_rejected(lambda: Ade9kAccess(0x10000), "address", "0..65535")
    assert_rejected(lambda: Ade9kAccess(-1), "address", "0..65535")
    assert_rejected(lambda: Ade9kAccess(0x4A0, 8), "size", "16 or 32")
    assert_rejected(lambda: Ade9kAccess(0x4A0, 16, write=0x10000), "write", "0..65535")
    assert_rejected(lambda: Ade9kAccess(0x4A0, 32, write=-1), "write", "0..4294967295")


@given(st.text(min_size=1, max_size=30))
def test_any_accepted_name_fits_and_round_trips(name: str) -> None:
    try:
        command = SetName(name)
    except CommandError:
        return
    assert len(name.encode()) <= 19 and "%" not in name
    assert json.loads(command.encode())["payload"]["name"] == name
