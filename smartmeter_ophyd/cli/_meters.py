"""``smartmeter info|get|set|read|ntp|logs HOST…``: one meter's settings and readings.

Thin over :class:`~smartmeter_ophyd.client.MeterClient`.  Every read command takes
``--json``; ``set`` checks every value with the codec before connecting, writes, re-reads the
info line and prints what changed (``name: 'a' -> 'b'``).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailedError,
    MeterAddress,
    UsageError,
    meter_address,
    print_json,
    say,
    table,
)

SETTINGS: Final = {
    # name: (info attribute, description)
    "name": ("name", "the meter's name (mDNS, AP, MQTT topics; §3.2)"),
    "time_server": ("time_server", "NTP server (§3.5)"),
    "mqtt_server": ("mqtt_server", "MQTT broker ('-' = none; §3.3)"),
    "stream_server": ("stream_server", "host dialled on port 54322 ('-' = none; §3.4)"),
    "calibration": ("calibration", "six factors v1,i1,v2,i2,v3,i3 (§3.8)"),
    "daily_restart": ("daily_restart", "HOUR:MINUTE of the daily restart, or none"),
    "wifi": ("ssids", "stored WiFi networks (passwords are never read)"),
    "sampling_rate": ("sampling_rate", "the info line's sampling rate (read only)"),
    "state": ("state", "idle / sampling (read only)"),
    "ip": ("ip", "IP address (read only)"),
    "version": ("version", "firmware version (read only)"),
    "compiled": ("compiled", "firmware build date (read only)"),
    "rtc": ("rtc", "DS3231 RTC present (read only)"),
    "psram": ("psram", "PSRAM present (read only)"),
    "buffer_size": ("buffer_size", "ring buffer bytes (read only)"),
    "sys_time": ("sys_time", "the meter's local time (read only; §6.1)"),
    "energy": ("energy", "energy counters, Wh (read only)"),
}
WRITABLE: Final = ("name", "time_server", "mqtt_server", "stream_server", "calibration",
                   "daily_restart", "wifi")


def add_address(p: argparse.ArgumentParser, many: bool = True) -> None:
    p.add_argument("meters", metavar="HOST[:PORT]", nargs="+" if many else None,
                   type=meter_address, help="meter address(es); port 54321 when omitted")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per command")


@contextlib.contextmanager
def connected(address: MeterAddress, timeout: float) -> Iterator[Any]:
    from ..client import MeterClient, MeterError

    client = MeterClient(address.host, address.port, timeout=timeout, reconnect=False)
    try:
        client.connect()
    except MeterError as exc:
        client.close()
        raise CommandFailedError(f"{address}: {exc}") from exc
    try:
        yield client
    except MeterError as exc:
        raise CommandFailedError(f"{address}: {exc}") from exc
    finally:
        client.close()


def _value(info: Any, setting: str) -> Any:
    value = getattr(info, SETTINGS[setting][0])
    if isinstance(value, tuple):
        return list(value)
    return value


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _for_each(args: argparse.Namespace, job: Callable[[Any, MeterAddress], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for address in args.meters:
        with connected(address, args.timeout) as client:
            out[str(address)] = job(client, address)
    return out


# ---------------------------------------------------------------------------- info / get


def cmd_info(args: argparse.Namespace) -> int:
    infos = _for_each(args, lambda client, _a: client.get_info())
    if args.json:
        raw = {addr: dict(info.raw_fields) for addr, info in infos.items()}
        print_json(raw if len(raw) > 1 else next(iter(raw.values())))
        return EXIT_OK
    for addr, info in infos.items():
        print(f"{addr}:")
        for key, value in info.raw_fields.items():
            print(f"  {key:>14}: {value}")
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    wanted = args.setting or list(SETTINGS)
    unknown = [s for s in wanted if s not in SETTINGS]
    if unknown:
        raise UsageError(f"smartmeter get: unknown setting(s) {unknown}; allowed: {list(SETTINGS)}")
    infos = _for_each(args, lambda client, _a: client.get_info())
    values = {addr: {s: _value(info, s) for s in wanted} for addr, info in infos.items()}
    if args.json:
        print_json(values if len(values) > 1 else next(iter(values.values())))
        return EXIT_OK
    for addr, settings in values.items():
        if len(values) > 1:
            print(f"{addr}:")
        for key, value in settings.items():
            print(f"{key:>14}: {_text(value)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ set


def _calibration(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: six numbers v1,i1,v2,i2,v3,i3") from None
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"{text!r}: six numbers v1,i1,v2,i2,v3,i3, not {len(values)}")
    return values


def _restart(text: str) -> tuple[int, int]:
    if text.lower() == "none":
        return (-1, 0)
    hour, sep, minute = text.partition(":")
    try:
        value = (int(hour), int(minute) if sep else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOUR:MINUTE or none") from None
    return value


def add_set_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="new name (at most 19 bytes, §3.2)")
    p.add_argument("--time-server", help="NTP server host name or address (§3.5)")
    p.add_argument("--mqtt-server", help="MQTT broker host, '-' for none (§3.3)")
    p.add_argument("--stream-server", help="host dialled on port 54322, '-' for none (§3.4)")
    p.add_argument("--calibration", type=_calibration, metavar="V1,I1,V2,I2,V3,I3",
                   help="calibration factors, each 0.5..2 (§3.8)")
    p.add_argument("--daily-restart", type=_restart, metavar="HOUR:MINUTE",
                   help="daily restart time, or none")
    p.add_argument("--add-wifi", metavar="SSID", help="store a WiFi network (§3.6)")
    p.add_argument("--wifi-password", default="", help="password for --add-wifi (never printed)")
    p.add_argument("--remove-wifi", metavar="SSID", help="forget a WiFi network (§3.6)")


def _checked_commands(args: argparse.Namespace) -> list[tuple[str, Any, str]]:
    """``(setting, value, client method)`` for every option given, codec-checked."""
    from ..protocol import (
        AddWifi,
        CommandError,
        DelWifi,
        SetCalibration,
        SetDailyRestart,
        SetMqttServer,
        SetName,
        SetStreamServer,
        SetTimeServer,
    )

    plan = [
        ("name", args.name, "set_name", lambda v: SetName(v)),
        ("time_server", args.time_server, "set_time_server", lambda v: SetTimeServer(v)),
        ("mqtt_server", args.mqtt_server, "set_mqtt_server", lambda v: SetMqttServer(v)),
        ("stream_server", args.stream_server, "set_stream_server", lambda v: SetStreamServer(v)),
        ("calibration", args.calibration, "set_calibration", lambda v: SetCalibration(v)),
        ("daily_restart", args.daily_restart, "set_daily_restart",
         lambda v: SetDailyRestart(*v)),
        ("wifi", args.add_wifi, "add_wifi", lambda v: AddWifi(v, args.wifi_password)),
        ("wifi", args.remove_wifi, "del_wifi", lambda v: DelWifi(v)),
    ]
    wanted = []
    for setting, value, method, build in plan:
        if value is None:
            continue
        try:
            build(value)
        except (CommandError, ValueError, TypeError) as exc:
            raise UsageError(f"smartmeter set: {setting}={_text(value)!s}: {exc}") from None
        wanted.append((setting, value, method))
    if not wanted:
        raise UsageError("smartmeter set: nothing to set; give at least one option (see --help)")
    if args.name is not None and len(args.meters) > 1:
        raise UsageError("smartmeter set: --name with several meters would give them one name")
    return wanted


def cmd_set(args: argparse.Namespace) -> int:
    wanted = _checked_commands(args)
    report: dict[str, list[dict[str, Any]]] = {}
    for address in args.meters:
        with connected(address, args.timeout) as client:
            before = client.get_info()
            replies = []
            for setting, value, method in wanted:
                call = getattr(client, method)
                reply = call(*value) if method == "set_daily_restart" else (
                    call(value, args.wifi_password) if method == "add_wifi" else call(value))
                replies.append((setting, getattr(reply, "message", "") or "ok"))
            after = client.get_info()
        changes = []
        for setting, message in replies:
            old, new = _value(before, setting), _value(after, setting)
            changes.append({"setting": setting, "before": old, "after": new, "meter": message})
        report[str(address)] = changes
    for addr, changes in report.items():
        for c in changes:
            state = "changed" if c["before"] != c["after"] else "unchanged"
            print(f"{addr} {c['setting']}: {_text(c['before'])} -> {_text(c['after'])} "
                  f"({state}; meter: {c['meter']})")
    return EXIT_OK


# ---------------------------------------------------------------------------- read / ntp


def cmd_read(args: argparse.Namespace) -> int:
    def read(client: Any, _a: MeterAddress) -> dict[str, Any]:
        voltage, current = client.get_voltage(), client.get_current()
        power, frequency = client.get_power(), client.get_frequency()
        angle = client.get_phase_angle()
        return {
            "voltage_V": list(voltage.values), "current_mA": list(current.values),
            "active_power_W": list(power.active), "reactive_power_var": list(power.reactive),
            "frequency_Hz": list(frequency.values), "phase_angle_deg": list(angle.values),
        }

    values = _for_each(args, read)
    if args.json:
        print_json(values if len(values) > 1 else next(iter(values.values())))
        return EXIT_OK
    for addr, reading in values.items():
        rows = [[key, *(f"{v:.3f}" for v in vals)] for key, vals in reading.items()]
        print(f"{addr}:")
        print(table(rows, ["reading", "L1", "L2", "L3"]))
    return EXIT_OK


def cmd_ntp(args: argparse.Namespace) -> int:
    from ..protocol import LogLine

    results: dict[str, dict[str, Any]] = {}
    for address in args.meters:
        confidence: list[str] = []

        def on_log(line: LogLine, confidence: list[str] = confidence) -> None:
            if line.text.startswith("NTP synced with conf:"):
                confidence.append(line.text.rsplit(":", 1)[1].strip())

        with connected(address, args.timeout) as client:
            client.subscribe_logs(on_log)
            reply = client.ntp_sync()
            info = client.get_info()
        results[str(address)] = {
            "synced": bool(reply.succeeded), "message": reply.message,
            "meter_time": reply.current_time,
            "confidence_ms": float(confidence[-1]) if confidence else None,
            "time_server": info.time_server,
        }
    if args.json:
        print_json(results if len(results) > 1 else next(iter(results.values())))
    else:
        for addr, r in results.items():
            conf = f"; confidence {r['confidence_ms']:g} ms" if r["confidence_ms"] is not None else ""
            print(f"{addr}: {r['message']}; meter time {r['meter_time']}{conf}")
            if not r["synced"]:
                print(f"{addr}: the meter could not reach its time server {r['time_server']!r}; "
                      f"point it at one it can reach: smartmeter set {addr} --time-server HOST")
    return EXIT_OK if all(r["synced"] for r in results.values()) else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    from ..protocol import LogLine

    done = threading.Event()

    def on_log(line: LogLine) -> None:
        print(f"[{line.level.tag}] {line.device_time}: {line.text}", flush=True)

    with connected(args.meters, args.timeout) as client:
        client.set_log_level(args.level)
        client.subscribe_logs(on_log)
        say(f"{args.meters}: following log lines at level {args.level} (Ctrl-C stops)")
        try:
            done.wait(args.seconds if args.seconds > 0 else None)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def setting_names() -> Sequence[str]:
    return list(SETTINGS)
