"""The firmware's command handlers as a table (protocol.md §2.7–§2.9, §3, §4.1, §4.4, §4.8, §5).

Each handler receives the reply object already holding ``error: true`` and ``cmd`` (§2.8),
adds its keys in the firmware's order and flips ``error`` where the firmware does (the key
keeps its first position).  Returning :data:`NO_REPLY` clears the object: nothing is sent
(``info``, successful ``reqSamples``, the reboot commands).

``cmd`` echo (§2.9): by default the command name is echoed everywhere.  With
``EmulatorConfig.corrupt_cmd_echo`` the replies the firmware corrupts (calibration,
dailyRestart, ade9k, second getLog line) echo a fragment of the reply's message text
instead (the text from the byte offset where the request's cmd value started).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from smartmeter_ophyd.protocol import (
    InputLine,
    JsonInput,
    KeepAlive,
    LogLevel,
    MalformedInput,
    Probe,
    Transport,
    arduino_bool,
    arduino_float,
    arduino_int,
    arduino_str,
    chunk_size,
    encode_raw_info_line,
    encode_reply,
    measures_from_input,
)

from . import _texts as texts
from ._clock import split_ms
from ._endpoints import Endpoint
from ._model import PendingStart, SampleSettings
from ._sinks import SINK_FACTORIES, EndpointSink, SinkRequest

if TYPE_CHECKING:
    from ._meter import EmulatedMeter

logger = logging.getLogger(__name__)


class _NoReply:
    def __repr__(self) -> str:
        return "NO_REPLY"


NO_REPLY: Final = _NoReply()

MDNS_MAX = 25
MQTT_SERVER_MAX = 17
STREAM_SERVER_MAX = 17
TIME_SERVER_MAX = 25
WIFI_FIELD_MAX = 20
CAL_MIN, CAL_MAX = 0.5, 2.0
SCHEDULE_MIN_MS, SCHEDULE_MAX_MS = 500, 20_000
SCHEDULE_RANDOM_WAIT_MS = 200


@dataclass
class Request:
    """One JSON command as the handler sees it."""

    endpoint: Endpoint
    value: dict[str, Any]
    raw: bytes

    @property
    def payload(self) -> dict[str, Any]:
        payload = self.value.get("payload")
        return payload if isinstance(payload, dict) else {}

    def get(self, key: str) -> Any:
        return self.value.get(key)


Handler = Callable[["EmulatedMeter", Request, dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class Command:
    handler: Handler
    busy_check: bool


async def handle_line(meter: EmulatedMeter, ep: Endpoint, parsed: InputLine, raw: bytes) -> None:
    """handleEvent (§2.2, §2.7, §2.8)."""
    if isinstance(parsed, Probe):
        meter.send_plain(ep, texts.SETUP_DONE)
    elif isinstance(parsed, KeepAlive):
        return
    elif isinstance(parsed, MalformedInput):
        meter.last_getter = ep  # newGetter (§8.3: MQTT commands act on it)
        meter.log(LogLevel.ERROR, parsed.log_text)
    elif isinstance(parsed, JsonInput):
        meter.last_getter = ep
        await _dispatch(meter, ep, parsed, raw)


async def _dispatch(meter: EmulatedMeter, ep: Endpoint, parsed: JsonInput, raw: bytes) -> None:
    reply = await run_json(meter, ep, parsed, raw)
    if reply and ep.alive:
        meter.send_reply(ep, reply)


async def run_json(
    meter: EmulatedMeter, ep: Endpoint, parsed: JsonInput, raw: bytes
) -> dict[str, Any] | None:
    """handleJSON: the reply object, None when nothing is sent (TCP, serial and MQTT, §8.2)."""
    cmd = parsed.cmd
    reply: dict[str, Any]
    if cmd is None:
        reply = {"error": True, "msg": texts.JSON_FORMAT_ERROR}
    else:
        reply = {"error": True, "cmd": cmd}
        command = COMMANDS.get(cmd)
        if command is None:
            meter.log(LogLevel.WARNING, texts.RECEIVED_UNKNOWN_COMMAND)
            reply["msg"] = texts.UNKNOWN_COMMAND
        elif command.busy_check and meter.session is not None:
            reply["msg"] = (
                texts.BUSY_WITH_IP.format(ip=meter.busy_ip) if meter.busy_ip else texts.BUSY
            )
            reply["state"] = "busy"
        else:
            request = Request(ep, parsed.value, raw)
            if await command.handler(meter, request, reply) is NO_REPLY:
                return None
    return reply or None


def _corrupt_echo(meter: EmulatedMeter, request: Request, reply: dict[str, Any], text: str) -> None:
    """§2.9: optionally replace the echoed cmd by a fragment of ``text``."""
    if not meter.config.corrupt_cmd_echo:
        return
    marker = request.raw.find(b'"cmd"')
    start = request.raw.find(b'"', marker + 5) + 1 if marker >= 0 else 0
    reply["cmd"] = text[start:]


# ----------------------------------------------------------------------- simple commands


async def cmd_info(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    request.endpoint.write(encode_reply(meter.info_fields()))
    return NO_REPLY


async def cmd_log(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    level = arduino_str(request.get("level"))
    if level is None:
        reply["msg"] = texts.LOG_LEVEL_MISSING
        return None
    try:
        new_level = {lv.wire_name: lv for lv in LogLevel}[level]
    except KeyError:
        reply["msg"] = texts.LOG_LEVEL_UNKNOWN.format(level=level)
        return None
    request.endpoint.log_level = new_level
    reply["msg"] = texts.LOG_LEVEL_SET.format(level=level)
    reply["error"] = False
    return None


def _server_setter(
    key: str, missing: str, too_long: str, limit: int, success: str, reply_key: str
) -> Handler:
    async def handler(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
        value = arduino_str(request.payload.get(key))
        if value is None:
            reply["msg"] = missing
            return None
        if len(value) >= limit:
            reply["msg"] = too_long
            return None
        await APPLY_SETTING[reply_key](meter, value)
        reply["msg"] = success.format(name=value, server=value)
        reply[reply_key] = value
        reply["error"] = False
        return None

    return handler


async def _apply_name(meter: EmulatedMeter, value: str) -> None:
    meter.stored.name = value
    meter.store.save()
    meter.log(LogLevel.INFO, texts.MDNS_LOG.format(name=value))
    if meter.mdns is not None:
        meter.mdns.announce()  # initMDNS: the responder begins again under the new name (§3.2)


async def _apply_mqtt(meter: EmulatedMeter, value: str) -> None:
    meter.stored.mqtt_server = value
    meter.store.save()
    await meter.mqtt.set_server()  # §3.3: disconnect, re-init, one blocking attempt


async def _apply_stream(meter: EmulatedMeter, value: str) -> None:
    meter.stored.stream_server = value
    meter.store.save()
    meter.init_stream_server()


async def _apply_time(meter: EmulatedMeter, value: str) -> None:
    meter.stored.time_server = value
    meter.store.save()
    await meter.ntp_sync()  # blocking; its success log precedes the reply (§3.5)


APPLY_SETTING: Final[dict[str, Callable[[EmulatedMeter, str], Awaitable[None]]]] = {
    "mdns_name": _apply_name,
    "mqtt_server": _apply_mqtt,
    "stream_server": _apply_stream,
    "time_server": _apply_time,
}


def _ssids_with_trailing_comma(meter: EmulatedMeter) -> str:
    """§3.6: ``"[" + each SSID + ", " + "]"`` — note the trailing comma-space."""
    return "[" + "".join(s + ", " for s in meter.stored.used_ssids()) + "]"


async def cmd_add_wifi(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    ssid = arduino_str(request.payload.get("ssid"))
    pwd = arduino_str(request.payload.get("pwd"))
    if ssid is None or pwd is None:
        reply["msg"] = texts.WIFI_ADD_MISSING
        return None
    if len(ssid) >= WIFI_FIELD_MAX or len(pwd) >= WIFI_FIELD_MAX:
        reply["msg"] = texts.WIFI_ADD_TOO_LONG
        return None
    c = meter.stored
    if ssid in c.used_ssids():
        reply["msg"] = texts.WIFI_DUPLICATE.format(ssid=ssid)  # error stays true (§3.6)
    elif c.ap_count >= len(c.ssids):
        reply["msg"] = texts.WIFI_FULL
        reply["error"] = False  # inverted flag (§3.6)
    else:
        c.ssids[c.ap_count], c.pwds[c.ap_count] = ssid, pwd
        c.ap_count += 1
        meter.store.save()
        reply["ssid"] = ssid
        reply["pwd"] = pwd
        reply["msg"] = texts.WIFI_ADDED.format(ssid=ssid, pwd=pwd)  # error stays true (§3.6)
    reply["ssids"] = _ssids_with_trailing_comma(meter)
    return None


async def cmd_del_wifi(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    ssid = arduino_str(request.payload.get("ssid"))
    if ssid is None:
        reply["msg"] = texts.WIFI_DEL_MISSING
        return None
    if len(ssid) >= WIFI_FIELD_MAX:
        reply["msg"] = texts.WIFI_DEL_TOO_LONG
        return None
    c = meter.stored
    # §3.6: the match also scans unused slots holding "-" placeholders (can corrupt the list).
    if ssid in c.ssids:
        i = c.ssids.index(ssid)
        c.ssids[i:] = [*c.ssids[i + 1 :], texts.UNSET]
        c.pwds[i:] = [*c.pwds[i + 1 :], texts.UNSET]
        c.ap_count = max(0, c.ap_count - 1)
        meter.store.save()
        reply["msg"] = texts.WIFI_REMOVED.format(ssid=ssid)
        reply["error"] = False
    else:
        reply["msg"] = texts.WIFI_NOT_FOUND.format(ssid=ssid)
    reply["ssids"] = _ssids_with_trailing_comma(meter)
    return None


async def cmd_ntp(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    if arduino_bool(request.payload.get("bg")):
        asyncio.get_running_loop().create_task(meter.ntp_sync(background=True))
        ok = True
    else:
        ok = await meter.ntp_sync() is not None
    reply["msg"] = texts.NTP_OK if ok else texts.NTP_FAILED
    reply["current_time"] = meter.long_time()
    reply["error"] = ok  # inverted flag (§3.7)
    return None


async def cmd_calibration(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    cal = request.get("cal")
    if not isinstance(cal, list):
        reply["msg"] = texts.CAL_MISSING
    elif len(cal) < 6:
        reply["msg"] = texts.CAL_TOO_FEW
    else:
        values = [arduino_float(v) for v in cal[:6]]
        bad = next((i for i, v in enumerate(values) if not CAL_MIN <= abs(v) <= CAL_MAX), None)
        if bad is not None:
            reply["msg"] = texts.CAL_RANGE.format(index=bad, value=values[bad])
        else:
            meter.stored.calibration = values
            meter.store.save()
            reply["msg"] = texts.CAL_SET.format(*values)
            reply["error"] = False
    _corrupt_echo(meter, request, reply, reply["msg"])
    return None


async def cmd_reset_energy(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    energy = request.get("energy")
    values = [0.0, 0.0, 0.0]
    if energy is not None:
        if not isinstance(energy, list) or len(energy) != 3:
            reply["msg"] = texts.ENERGY_NEED_3
            return None
        values = [arduino_float(v) for v in energy]
    ts = request.get("ts")
    reset_ts = arduino_float(ts) if ts is not None else meter.meter_unix()
    meter.ade_energy(reset=True)
    meter.stored.energy_wh = values
    meter.stored.energy_reset_ts = reset_ts
    meter.store.save()
    reply["msg"] = texts.ENERGY_RESET.format(*values, when=meter.long_time(reset_ts))
    reply["error"] = False
    return None


def _reading(key: str, unit: str, field: str) -> Handler:
    async def handler(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
        snap = meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit)
        reply[key] = [float(x) for x in list(getattr(snap, field))[:3]]
        reply["unit"] = unit
        reply["error"] = False
        return None

    return handler


async def cmd_get_power(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    snap = meter.grid.snapshot(meter.clock.true_now(), meter.config.circuit)
    reactive = [float(x) for x in list(snap.reactive_power)[:3]]
    reply["activePower"] = [float(x) for x in list(snap.active_power)[:3]]
    reply["reactivePower"] = reactive
    reply["apparentPower"] = list(reactive)  # §3.10 bug: filled from the reactive registers
    reply["unit"] = "W/var/VA"
    reply["error"] = False
    return None


async def cmd_get_energy(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    # §12 #11: the ADE energy registers are read-with-reset and the amount read is NOT added
    # to the stored total, so it is lost from the running total.
    fresh = meter.ade_energy(reset=True)
    c = meter.stored
    reply["energy"] = [float(a + b) for a, b in zip(c.energy_wh, fresh, strict=True)]
    reply["unit"] = "Wh"
    reply["startTs"] = int(c.energy_reset_ts)
    reply["start"] = meter.long_time(c.energy_reset_ts)
    now = meter.meter_unix()
    reply["days"] = int(max(0.0, now - c.energy_reset_ts) // 86400)
    reply["error"] = False
    return None


async def cmd_clear_log(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    meter.stored.clear_log()
    meter.store.save()
    reply["error"] = False
    return None


async def cmd_get_log(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    c = meter.stored
    rows = "".join(row + texts.LOG_ROW_SEPARATOR for row in [*c.log_old, *c.log_current])
    text = '{"cmd":"log","msg":"' + texts.LOGFILE_MARK + texts.LOG_ROW_SEPARATOR + rows + texts.LOGFILE_MARK + '"}'
    request.endpoint.write(encode_raw_info_line(text))
    reply["error"] = False
    last_row = (c.log_current or c.log_old or [""])[-1]
    _corrupt_echo(meter, request, reply, last_row)
    return None


async def cmd_daily_restart(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    if request.get("hour") is None or request.get("minute") is None:
        reply["msg"] = texts.DAILY_MISSING
        return None
    hour, minute = arduino_int(request.get("hour")), arduino_int(request.get("minute"))
    if not -1 <= hour <= 23:
        reply["msg"] = texts.DAILY_HOUR
        return None
    if not -1 <= minute <= 59:
        reply["msg"] = texts.DAILY_MINUTE
        return None
    meter.stored.reset_hour, meter.stored.reset_minute = hour, minute
    meter.store.save()
    reply["msg"] = texts.DAILY_DISABLED if hour < 0 else texts.DAILY_SET.format(hour=hour, minute=minute)
    reply["error"] = False
    _corrupt_echo(meter, request, reply, reply["msg"])
    return None


def _hex(text: str | None) -> int | None:
    if text is None or len(text) < 3 or not text.startswith("0x"):
        return None
    try:
        return int(text[2:], 16)
    except ValueError:
        return None


async def cmd_ade9k(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    address_text = arduino_str(request.get("address"))
    if address_text is None:
        reply["msg"] = texts.ADE_MISSING_ADDRESS
        return None
    if request.get("size") is None:
        reply["msg"] = texts.ADE_MISSING_SIZE
        return None
    address = _hex(address_text)
    write_text = arduino_str(request.get("write"))
    write = _hex(write_text) if request.get("write") is not None else None
    if address is None or (request.get("write") is not None and write is None):
        reply["msg"] = texts.ADE_NOT_HEX
        reply["what"] = address_text if address is None else (write_text or "")
        return None
    mask = 0xFFFF if arduino_int(request.get("size")) == 16 else 0xFFFFFFFF
    value = meter.ade_registers.get(address, 0) & mask
    msg = texts.ADE_READ.format(addr=address, value=value)
    if write is not None:
        meter.ade_registers[address] = write & mask
        reread = meter.ade_registers[address]
        reply["newRegValue"] = reread
        msg += texts.ADE_WRITE.format(write=write & mask, reread=reread)
    reply["msg"] = msg
    reply["regValue"] = value
    reply["error"] = False
    _corrupt_echo(meter, request, reply, msg)
    return None


async def cmd_reboot(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    cmd = request.get("cmd")
    if cmd == "factoryReset":
        meter.stored.make_default(keep_name=False)
        meter.store.save()
    elif cmd == "basicReset":
        meter.stored.make_default(keep_name=True)
        meter.store.save()
    meter.request_reboot()
    return NO_REPLY


# ------------------------------------------------------------------ sampling (§4, §5)


async def cmd_sample(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    """handleJSON/sample with the validation order of §4.1."""
    payload = request.payload
    type_text = arduino_str(payload.get("type"))
    rate = arduino_int(payload.get("rate"))
    if type_text is None or rate == 0:
        reply["msg"] = (
            texts.SAMPLE_INVALID
            + (texts.SAMPLE_TYPE_MISSING if type_text is None else "")
            + (texts.SAMPLE_RATE_MISSING if rate == 0 else "")
        )
        return None
    settings = SampleSettings()
    meter.sample_settings = settings  # §4.1 step 3: reset even if a later check fails
    measures_text = arduino_str(payload.get("measures"))
    measures = measures_from_input(measures_text)
    if measures is None:
        reply["msg"] = texts.UNSUPPORTED_MEASURES.format(measures=measures_text)
        return None
    settings.measures = measures
    if measures.latched:
        if rate > 50:
            reply["msg"] = texts.RATE_LATCHED.format(measures=measures.reported)
            return None
    elif rate < 0 or 32000 % rate:
        # Negative rates pass the firmware's modulo test with undefined results; refused here.
        reply["msg"] = texts.RATE_NOT_SET.format(rate=rate)
        return None
    settings.rate = rate
    transport = {t.value: t for t in Transport}.get(type_text)
    if transport is None:
        reply["msg"] = texts.UNSUPPORTED_TYPE.format(type=type_text)
        return None
    udp_port = 0
    if transport is Transport.UDP:
        udp_port = arduino_int(payload.get("port"))
        if not 1 <= udp_port <= 80000:
            reply["msg"] = texts.UNSUPPORTED_UDP_PORT.format(port=udp_port)
            return None
        udp_port &= 0xFFFF
    if transport is Transport.FFMPEG and not meter.raw_stream_pending:
        reply["msg"] = texts.NO_TCP_STREAM
        return None
    if transport is Transport.SERIAL and meter.serial is None:
        reply["msg"] = texts.UNSUPPORTED_TYPE.format(type=type_text)
        return None
    settings.transport = transport
    prefix = payload.get("prefix")
    settings.prefix = True if prefix is None else arduino_bool(prefix)
    if arduino_bool(payload.get("flowCtr")):
        settings.flow_control = True
        settings.rts = False
    slot_value = payload.get("slot")
    if "slot" in payload:
        settings.rts = False
        if isinstance(slot_value, list) and len(slot_value) >= 2:
            settings.slot = (arduino_int(slot_value[0]), arduino_int(slot_value[1]))
        else:
            settings.slot = (0, 0)
    sink = SINK_FACTORIES[transport](
        SinkRequest(
            requester=request.endpoint,
            serial=meter.serial,
            udp_port=udp_port,
            datagrams=meter.datagrams,
            datagram_fault=meter.take_datagram_fault,
            mqtt=meter.mqtt,
        )
    )
    reply["cmd"] = "sample"
    if transport is Transport.UDP:
        reply["port"] = udp_port
    if "slot" in payload:
        reply["slot"] = slot_value
    reply["measures"] = measures.reported
    reply["chunksize"] = chunk_size(rate, measures.bytes_per_sample, _chunk_transport(transport))
    reply["samplingrate"] = rate
    reply["conn_type"] = type_text
    reply["measurements"] = measures.values_per_sample
    reply["prefix"] = settings.prefix
    reply["flowCtr"] = settings.flow_control
    reply["unit"] = measures.spec.unit_string
    if payload.get("time") is None:
        session = meter.start_session(settings, sink, request.endpoint)
        reply["startTs"] = session.start_ts_text
        reply["error"] = False
        return None
    # §6.4 scheduled start: random wait, blocking NTP, unsigned 32-bit window check.
    at_s = arduino_int(payload.get("time"))
    await asyncio.sleep(meter.random_ms(SCHEDULE_RANDOM_WAIT_MS) / 1000)
    await meter.ntp_sync()
    now = meter.meter_unix()
    now_s, now_ms = split_ms(now)  # carries: .9996 s is the next second
    delta_ms = ((at_s - now_s) * 1000 - now_ms) & 0xFFFFFFFF
    when = meter.long_time(float(at_s))
    if SCHEDULE_MIN_MS <= delta_ms <= SCHEDULE_MAX_MS:
        reply["startTs"] = f"{at_s}.000"
        reply["msg"] = texts.SCHEDULE_OK.format(when=when, delta=delta_ms)
        reply["error"] = False
        meter.pending_start = PendingStart(at_s, settings, sink, request.endpoint,
                                           due_true=meter.countdown_true(delta_ms, now))
    else:
        reply["msg"] = texts.SCHEDULE_BAD.format(when=when, delta=delta_ms)
    return None


def _chunk_transport(transport: Transport) -> Transport:
    return transport if transport in (Transport.UDP, Transport.SERIAL) else Transport.TCP


async def cmd_stop(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    if meter.session is None:
        return None  # {"error":true,"cmd":"stop"}; a pending scheduled start is NOT cancelled
    reply.clear()
    reply.update(meter.stop_session())
    return None


async def cmd_cts(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    if request.get("value") is None:
        reply["msg"] = texts.CTS_INVALID
        return None
    rts = arduino_bool(request.get("value"))
    meter.sample_settings.rts = rts
    if meter.session is not None:
        meter.session.settings.rts = rts
    reply["error"] = False
    return None


async def cmd_req_samples(meter: EmulatedMeter, request: Request, reply: dict[str, Any]) -> object:
    """§5.2: sets rts, 11..2000, silent success, silent when not enough data."""
    s = meter.session
    if s is None or not s.waveform:
        return None
    s.settings.rts = True
    n = arduino_int(request.get("samples"))
    if n <= 10 or n > 2000:
        reply["msg"] = texts.REQ_RANGE.format(n=n)
        return None
    nbytes = n * s.bps
    if meter.ring.readable >= nbytes:
        if nbytes > 1029:
            # Firmware 2.2 overruns its 1040-byte send buffer here; emulated as a crash.
            meter.log(LogLevel.ERROR, texts.REQ_SEND_BUFFER_OVERFLOW.format(nbytes=nbytes))
            meter.request_reboot()
            return NO_REPLY
        if isinstance(s.sink, EndpointSink):  # §4.13: the UDP path sends nothing useful
            meter.emit_single(s, s.sink, meter.ring.read(nbytes))
    return NO_REPLY


COMMANDS: Final[dict[str, Command]] = {
    "sample": Command(cmd_sample, busy_check=True),
    "stop": Command(cmd_stop, busy_check=False),
    "cts": Command(cmd_cts, busy_check=False),
    "reqSamples": Command(cmd_req_samples, busy_check=False),
    "info": Command(cmd_info, busy_check=False),
    "log": Command(cmd_log, busy_check=False),
    "mdns": Command(
        _server_setter("name", texts.MDNS_MISSING, texts.MDNS_TOO_LONG, 25, texts.MDNS_SET, "mdns_name"),
        busy_check=True,
    ),
    "mqttServer": Command(
        _server_setter("server", texts.MQTT_MISSING, texts.MQTT_TOO_LONG, 17, texts.MQTT_SET, "mqtt_server"),
        busy_check=True,
    ),
    "streamServer": Command(
        _server_setter(
            "server", texts.STREAM_MISSING, texts.STREAM_TOO_LONG, 17, texts.STREAM_SET, "stream_server"
        ),
        busy_check=True,
    ),
    "timeServer": Command(
        _server_setter("server", texts.TIME_MISSING, texts.TIME_TOO_LONG, 25, texts.TIME_SET, "time_server"),
        busy_check=True,
    ),
    "addWifi": Command(cmd_add_wifi, busy_check=True),
    "delWifi": Command(cmd_del_wifi, busy_check=True),
    "ntp": Command(cmd_ntp, busy_check=False),
    "calibration": Command(cmd_calibration, busy_check=True),
    "resetEnergy": Command(cmd_reset_energy, busy_check=True),
    "getPower": Command(cmd_get_power, busy_check=True),
    "getVoltage": Command(_reading("voltage", "V", "voltage_rms"), busy_check=True),
    "getCurrent": Command(_reading("current", "mA", "current_rms"), busy_check=True),
    "getEnergy": Command(cmd_get_energy, busy_check=True),
    "getPeriod": Command(_reading("period", "Hz", "frequency"), busy_check=True),
    "getPhaseAngle": Command(_reading("phase", "Deg", "phase_angle"), busy_check=True),
    "clearLog": Command(cmd_clear_log, busy_check=True),
    "getLog": Command(cmd_get_log, busy_check=True),
    "dailyRestart": Command(cmd_daily_restart, busy_check=True),
    "ade9k": Command(cmd_ade9k, busy_check=True),
    "restart": Command(cmd_reboot, busy_check=False),
    "factoryReset": Command(cmd_reboot, busy_check=False),
    "basicReset": Command(cmd_reboot, busy_check=False),
}
"""cmd → handler and whether it runs the busy check (§3 table)."""
