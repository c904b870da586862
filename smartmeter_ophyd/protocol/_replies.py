"""Typed, frozen views of the meter's JSON replies, tolerant of firmware 2.2's quirks.

Build views with :func:`parse_reply` from a decoded :class:`~._events.Reply`.  What is
tolerated (protocol.md §2.8, §2.9, §12):

* the inverted ``error`` flag of ``ntp`` and ``addWifi`` -- success is judged from ``msg``
  (:func:`reply_succeeded`);
* ``stop``'s ``error`` key coming last, and its idle form ``{"error":true,"cmd":"stop"}``;
* a corrupted ``cmd`` echo for ``calibration``, ``dailyRestart``, ``ade9k``, ``getLog``;
* busy replies (``"state":"busy"``) to any busy-checked command (:func:`is_busy`);
* ``getLog``'s first line, which is often not JSON and uses ``//n`` separators
  (:func:`parse_log_dump`);
* missing or extra keys in the info line (real meters may differ; ``raw_fields`` keeps all).

What is *not* tolerated: a success reply that lacks the data it exists for (a reading
without its three values, a sample reply without a known ``measures``), and a reliable
``cmd`` echo naming another command -- both raise :class:`RemoteProtocolError`.

Every view keeps ``raw_fields`` (the reply's keys in firmware order) for diagnostics.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import RemoteProtocolError
from ._events import LogLevel, Reply, UnparsedReply
from ._measures import Measures, Transport, measures_from_reported
from ._timefmt import parse_long_time, parse_timestamp

LOG_SEPARATOR: Final = "//n"
"""The firmware's stand-in for a newline inside ``msg`` texts (§3.14, §6.4)."""
LOG_MARKER: Final = "*** LOGFile ***"

_BUSY_IP_RE: Final = re.compile(r"Device with IP: (\S+) currently sampling")
_SCHEDULED_RE: Final = re.compile(r"(Start|Cannot start) sampling in: (-?\d+)\s*ms")
_SHOULD_AT_RE: Final = re.compile(r"Should sample at: (.*?)\s*(?://n|$)")
_DAILY_RE: Final = re.compile(r"^@(\d{1,2}):(\d{2})(?::\d{2})?$")


# ------------------------------------------------------------------------ field access


def _str(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


def _int(fields: dict[str, Any], key: str) -> int | None:
    value = fields.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _float(fields: dict[str, Any], key: str) -> float | None:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _bool(fields: dict[str, Any], key: str) -> bool | None:
    value = fields.get(key)
    return value if isinstance(value, bool) else None


def _timestamp(fields: dict[str, Any], key: str) -> float | None:
    """A ``"<unix>.<mmm>"`` timestamp string (§6.1); numbers are accepted too."""
    value = fields.get(key)
    if isinstance(value, str):
        try:
            return parse_timestamp(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _numbers(value: Any, count: int | None = None) -> tuple[float, ...] | None:
    if not isinstance(value, list):
        return None
    if count is not None and len(value) != count:
        return None
    numbers: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float):
            return None
        numbers.append(float(item))
    return tuple(numbers)


def _triple(value: Any) -> tuple[float, float, float] | None:
    numbers = _numbers(value, 3)
    return None if numbers is None else (numbers[0], numbers[1], numbers[2])


def parse_bracket_list(text: str) -> list[str]:
    """``"[a, b, ]"`` -> ``["a", "b"]``: the firmware's hand-built lists (§2.5, §3.6).

    Tolerates the trailing ``", "`` quirk and the empty list ``"[]"``.
    """
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    return [item.strip() for item in inner.split(",") if item.strip()]


def parse_energy_string(text: str) -> tuple[float, float, float] | None:
    """The info line's ``energy`` **string** ``"[%.4f, %.4f, %.4f]"`` (§2.5)."""
    try:
        values = [float(item) for item in parse_bracket_list(text)]
    except ValueError:
        return None
    if len(values) != 3:
        return None
    return (values[0], values[1], values[2])


def _require(reply: Reply, expected_cmd: str, key: str, value: Any, what: str) -> Any:
    if value is None:
        raise RemoteProtocolError(
            f"reply to {expected_cmd!r} lacks {what} in key {key!r}: {reply.raw!r}"
        )
    return value


# ------------------------------------------------------------------------- the views


@dataclass(frozen=True, slots=True)
class ReplyView:
    """Common part of every view.

    ``succeeded`` already accounts for inverted flags; ``cmd`` is the echo as received
    (possibly corrupted, §2.9).
    """

    succeeded: bool
    cmd: str | None
    message: str | None
    raw_fields: dict[str, Any] = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class ErrorReply(ReplyView):
    """A failed command with nothing but a message (validation errors, unknown command)."""


@dataclass(frozen=True, slots=True)
class BusyReply(ReplyView):
    """The command was refused because a session is sampling (§2.8).

    ``device_ip`` is the *meter's own* address from the message (None for
    ``"Currently sampling"``).
    """

    device_ip: str | None


@dataclass(frozen=True, slots=True)
class MessageReply(ReplyView):
    """Replies that carry only ``msg`` (and an echoed setting): ``cts``, ``mdns``,
    ``mqttServer``, ``streamServer``, ``timeServer``, ``calibration``, ``resetEnergy``,
    ``clearLog``, ``dailyRestart``, ``getLog`` (its second line).

    ``value`` is the echoed setting where there is one (``mdns_name``, ``mqtt_server``,
    ``stream_server``, ``time_server``).
    """

    value: str | None


@dataclass(frozen=True, slots=True)
class LogLevelReply(ReplyView):
    """``log`` (§3.1): ``level`` parsed from ``Log Level set to: <level>``."""

    level: LogLevel | None


@dataclass(frozen=True, slots=True)
class DeviceInfo(ReplyView):
    """The info line (§2.5).  Every field is None when the meter did not send it.

    ``energy`` is parsed from the ``energy`` *string*; ``daily_restart`` is ``(hour,
    minute)`` from ``"@HH:MM:00"`` (None for ``"None"``); ``ssids`` from the hand-built
    ``"[a, b]"`` string.  ``sys_time`` is the meter's *local* long time (§6.1): use
    :meth:`sys_time_unix` to convert.
    """

    device_type: str | None
    version: str | None
    compiled: str | None
    sys_time: str | None
    name: str | None
    ip: str | None
    mqtt_server: str | None
    stream_server: str | None
    time_server: str | None
    sampling_rate: int | None
    buffer_size: int | None
    psram: bool | None
    rtc: bool | None
    state: str | None
    energy: tuple[float, float, float] | None
    daily_reset: str | None
    daily_restart: tuple[int, int] | None
    calibration: tuple[float, ...] | None
    ssids: tuple[str, ...]

    @property
    def is_smartmeter(self) -> bool:
        return self.device_type is not None and self.device_type.lower() == "smartmeter"

    @property
    def busy(self) -> bool:
        return self.state == "busy"

    def sys_time_unix(self, dst_known: bool = True) -> float | None:
        """``sys_time`` as unix seconds (None if absent or unparsable)."""
        if self.sys_time is None:
            return None
        try:
            return parse_long_time(self.sys_time, dst_known)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class ScheduledStart:
    """The ``msg`` of a scheduled ``sample`` reply (§6.4).

    ``delay_ms`` is the firmware's unsigned 32-bit delta (past times appear huge).
    """

    accepted: bool
    delay_ms: int
    should_sample_at: str | None
    """Long local time of the requested start, as printed by the meter."""


def parse_scheduled_message(message: str) -> ScheduledStart | None:
    """``Should sample at: <t>//nStart sampling in: <n>ms`` (or ``Cannot start ...``)."""
    match = _SCHEDULED_RE.search(message)
    if match is None:
        return None
    at = _SHOULD_AT_RE.search(message)
    return ScheduledStart(
        accepted=match.group(1) == "Start",
        delay_ms=int(match.group(2)),
        should_sample_at=at.group(1) if at else None,
    )


@dataclass(frozen=True, slots=True)
class SampleReply(ReplyView):
    """Reply to ``sample`` (§4.4, §6.4).

    ``start_ts`` is ``startTs`` as unix seconds; the firmware reports ``0.0`` before its
    first NTP sync (§6.1) -- that value is kept, callers decide whether to trust it.  It
    is None when absent (a rejected scheduled start).  ``scheduled`` is set for scheduled
    starts; ``succeeded`` is False when the meter refused the start time.
    """

    measures: Measures
    chunk_size: int
    sampling_rate: int
    conn_type: str | None
    measurements: int | None
    prefix: bool | None
    flow_control: bool | None
    units: tuple[str, ...]
    start_ts: float | None
    scheduled: ScheduledStart | None
    port: int | None
    slot: tuple[int, int] | None

    @property
    def transport(self) -> Transport | None:
        try:
            return Transport(self.conn_type)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class StopReply(ReplyView):
    """Reply to ``stop`` (§4.8).  When the meter was idle (or only counting down to a
    scheduled start) the reply is ``{"error":true,"cmd":"stop"}``: ``succeeded`` False and
    every other field None."""

    sample_duration_ms: int | None
    samples: int | None
    sent_samples: int | None
    start_ts: float | None
    stop_ts: float | None
    ip: str | None
    avg_rate: float | None

    @property
    def was_idle(self) -> bool:
        return not self.succeeded and self.samples is None


class LineQuantity(enum.Enum):
    """What a :class:`LineValues` reading holds, by the command that produced it."""

    VOLTAGE = "voltage"
    CURRENT = "current"
    FREQUENCY = "period"
    """``getPeriod`` answers line frequencies in Hz under the key ``period`` (§12 #13)."""
    PHASE_ANGLE = "phase"


_LINE_COMMANDS: Final[dict[str, LineQuantity]] = {
    "getVoltage": LineQuantity.VOLTAGE,
    "getCurrent": LineQuantity.CURRENT,
    "getPeriod": LineQuantity.FREQUENCY,
    "getPhaseAngle": LineQuantity.PHASE_ANGLE,
}


@dataclass(frozen=True, slots=True)
class LineValues(ReplyView):
    """Three per-line values (L1, L2, L3) from getVoltage (V), getCurrent (mA),
    getPeriod (**frequency, Hz**) or getPhaseAngle (degrees) (§3.10)."""

    quantity: LineQuantity
    values: tuple[float, float, float]
    unit: str | None

    @property
    def l1(self) -> float:
        return self.values[0]

    @property
    def l2(self) -> float:
        return self.values[1]

    @property
    def l3(self) -> float:
        return self.values[2]


@dataclass(frozen=True, slots=True)
class PowerReading(ReplyView):
    """``getPower`` (§3.10), per line.

    Firmware bug (§12 #9): ``apparent`` is filled from the *reactive* power registers, so
    it equals ``reactive``; it is passed through as sent, not recomputed.
    """

    active: tuple[float, float, float]
    reactive: tuple[float, float, float]
    apparent: tuple[float, float, float]
    unit: str | None


@dataclass(frozen=True, slots=True)
class EnergyReading(ReplyView):
    """``getEnergy`` (§3.10): Wh per line since the last reset.

    ``start_ts`` is the integer unix time of the last reset, ``start`` the same as long
    local time, ``days`` whole days since.  Reading resets the ADE accumulators (§12 #11).
    """

    energy: tuple[float, float, float]
    unit: str | None
    start_ts: int | None
    start: str | None
    days: int | None


@dataclass(frozen=True, slots=True)
class NtpReply(ReplyView):
    """``ntp`` (§3.7): ``succeeded`` comes from ``msg == "Time synced"``, not the
    (inverted) flag.  ``current_time`` is the meter's long local time after the sync."""

    current_time: str | None


class WifiOutcome(enum.Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"
    FULL = "full"
    REMOVED = "removed"
    NOT_FOUND = "not found"
    REFUSED = "refused"
    """A validation error (missing or too long SSID/password)."""


@dataclass(frozen=True, slots=True)
class WifiReply(ReplyView):
    """``addWifi``/``delWifi`` (§3.6): outcome from ``msg``; ``ssids`` parsed from the
    trailing-comma string.  ``succeeded`` is True for added, duplicate (already listed)
    and removed."""

    outcome: WifiOutcome
    ssids: tuple[str, ...]
    ssid: str | None
    pwd: str | None = field(repr=False)  # the firmware echoes the password; keep it out of reprs


@dataclass(frozen=True, slots=True)
class Ade9kReply(ReplyView):
    """``ade9k`` (§3.13): register value read before the write, and re-read after it."""

    reg_value: int | None
    new_reg_value: int | None


@dataclass(frozen=True, slots=True)
class LogDump(ReplyView):
    """``getLog``'s first line when it happens to be valid JSON (cmd ``log``, §3.14)."""

    rows: tuple[str, ...]


# ---------------------------------------------------------------------- classification


def is_busy(reply: Reply) -> bool:
    """True for the busy reply (§2.8).

    Requires ``error`` true as well as ``state`` ``busy``: the *info line* also carries
    ``state`` (``"busy"`` while sampling) but is not a refusal.
    """
    return reply.fields.get("state") == "busy" and reply.error is True


def is_log_dump(reply: Reply) -> bool:
    """True for ``getLog``'s first line parsed as JSON (``cmd`` ``log``, msg with markers)."""
    message = reply.fields.get("msg")
    return reply.cmd == "log" and isinstance(message, str) and message.startswith(LOG_MARKER)


def _wifi_outcome(message: str | None) -> WifiOutcome:
    text = message or ""
    if text.startswith("New Ap"):
        return WifiOutcome.ADDED
    if text.startswith("Wifi AP") and text.endswith("already in list"):
        return WifiOutcome.DUPLICATE
    if text.startswith("MAX # APs"):
        return WifiOutcome.FULL
    if text.startswith("Removed SSID"):
        return WifiOutcome.REMOVED
    if text.startswith("SSID") and text.endswith("not found"):
        return WifiOutcome.NOT_FOUND
    return WifiOutcome.REFUSED


_WIFI_SUCCESS: Final = frozenset({WifiOutcome.ADDED, WifiOutcome.DUPLICATE, WifiOutcome.REMOVED})


def _command_name(command: str | type[Any]) -> str:
    if isinstance(command, str):
        return command
    name = getattr(command, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"{command!r} is not a command class or wire name")
    return name


def reply_succeeded(command: str | type[Any], reply: Reply) -> bool:
    """Did ``command`` (a wire name or command class) succeed, judging ``reply`` as the
    firmware means it?  Knows the inverted flags of ``ntp`` and ``addWifi`` (§12 #1)."""
    name = _command_name(command)
    if is_busy(reply):
        return False
    message = _str(reply.fields, "msg")
    if name == "info":
        return reply.cmd == "info"  # the info line has no error flag (§2.5)
    if name == "ntp":
        return message == "Time synced"
    if name == "addWifi":
        return _wifi_outcome(message) in _WIFI_SUCCESS
    return reply.error is False


# --------------------------------------------------------------------------- parsing

_MESSAGE_VALUE_KEYS: Final[dict[str, str | None]] = {
    "cts": None,
    "mdns": "mdns_name",
    "mqttServer": "mqtt_server",
    "streamServer": "stream_server",
    "timeServer": "time_server",
    "calibration": None,
    "resetEnergy": None,
    "clearLog": None,
    "dailyRestart": None,
    "getLog": None,
}

_UNRELIABLE_ECHO: Final = frozenset({"calibration", "dailyRestart", "ade9k", "getLog"})


def _base(reply: Reply, succeeded: bool) -> dict[str, Any]:
    return {
        "succeeded": succeeded,
        "cmd": reply.cmd,
        "message": _str(reply.fields, "msg"),
        "raw_fields": dict(reply.fields),
    }


def _device_info(reply: Reply) -> DeviceInfo:
    f = reply.fields
    energy_text = _str(f, "energy")
    energy = (
        parse_energy_string(energy_text) if energy_text is not None else _triple(f.get("energy"))
    )
    daily = _str(f, "dailyReset")
    daily_match = _DAILY_RE.match(daily) if daily else None
    ssids = _str(f, "ssids")
    return DeviceInfo(
        **_base(reply, True),
        device_type=_str(f, "type"),
        version=_str(f, "version"),
        compiled=_str(f, "compiled"),
        sys_time=_str(f, "sys_time"),
        name=_str(f, "name"),
        ip=_str(f, "ip"),
        mqtt_server=_str(f, "mqtt_server"),
        stream_server=_str(f, "stream_server"),
        time_server=_str(f, "time_server"),
        sampling_rate=_int(f, "sampling_rate"),
        buffer_size=_int(f, "buffer_size"),
        psram=_bool(f, "psram"),
        rtc=_bool(f, "rtc"),
        state=_str(f, "state"),
        energy=energy,
        daily_reset=daily,
        daily_restart=(
            (int(daily_match.group(1)), int(daily_match.group(2))) if daily_match else None
        ),
        calibration=_numbers(f.get("calibration")),
        ssids=tuple(parse_bracket_list(ssids)) if ssids is not None else (),
    )


def _sample(reply: Reply) -> SampleReply | ErrorReply:
    f = reply.fields
    message = _str(f, "msg")
    scheduled = parse_scheduled_message(message) if message else None
    succeeded = reply.error is False
    if "measures" not in f:
        if succeeded:
            raise RemoteProtocolError(f"sample reply without 'measures': {reply.raw!r}")
        return ErrorReply(**_base(reply, False))
    reported = _str(f, "measures")
    try:
        measures = measures_from_reported(reported or "")
    except ValueError:
        raise RemoteProtocolError(
            f"sample reply reports unknown measures {f.get('measures')!r}: {reply.raw!r}"
        ) from None
    unit = _str(f, "unit")
    slot = _numbers(f.get("slot"), 2)
    return SampleReply(
        **_base(reply, succeeded),
        measures=measures,
        chunk_size=_require(reply, "sample", "chunksize", _int(f, "chunksize"), "the chunk size"),
        sampling_rate=_require(
            reply, "sample", "samplingrate", _int(f, "samplingrate"), "the rate"
        ),
        conn_type=_str(f, "conn_type"),
        measurements=_int(f, "measurements"),
        prefix=_bool(f, "prefix"),
        flow_control=_bool(f, "flowCtr"),
        units=tuple(unit.split(",")) if unit else (),
        start_ts=_timestamp(f, "startTs"),
        scheduled=scheduled,
        port=_int(f, "port"),
        slot=(int(slot[0]), int(slot[1])) if slot and all(v.is_integer() for v in slot) else None,
    )


def _stop(reply: Reply) -> StopReply:
    f = reply.fields
    return StopReply(
        **_base(reply, reply.error is False),
        sample_duration_ms=_int(f, "sample_duration"),
        samples=_int(f, "samples"),
        sent_samples=_int(f, "sent_samples"),
        start_ts=_timestamp(f, "start_ts"),
        stop_ts=_timestamp(f, "stop_ts"),
        ip=_str(f, "ip"),
        avg_rate=_float(f, "avg_rate"),
    )


def _line_values(reply: Reply, name: str) -> LineValues:
    quantity = _LINE_COMMANDS[name]
    values = _require(
        reply, name, quantity.value, _triple(reply.fields.get(quantity.value)), "3 numbers"
    )
    return LineValues(
        **_base(reply, True),
        quantity=quantity,
        values=values,
        unit=_str(reply.fields, "unit"),
    )


def _power(reply: Reply) -> PowerReading:
    f = reply.fields

    def triple(key: str) -> tuple[float, float, float]:
        value: tuple[float, float, float] = _require(
            reply, "getPower", key, _triple(f.get(key)), "3 numbers"
        )
        return value

    return PowerReading(
        **_base(reply, True),
        active=triple("activePower"),
        reactive=triple("reactivePower"),
        apparent=triple("apparentPower"),
        unit=_str(f, "unit"),
    )


def _energy(reply: Reply) -> EnergyReading:
    f = reply.fields
    return EnergyReading(
        **_base(reply, True),
        energy=_require(reply, "getEnergy", "energy", _triple(f.get("energy")), "3 numbers"),
        unit=_str(f, "unit"),
        start_ts=_int(f, "startTs"),
        start=_str(f, "start"),
        days=_int(f, "days"),
    )


_PASSWORD_IN_MESSAGE: Final = re.compile(r"PW: .*$")


def _wifi(reply: Reply) -> WifiReply:
    f = reply.fields
    outcome = _wifi_outcome(_str(f, "msg"))
    ssids = _str(f, "ssids")
    base = _base(reply, outcome in _WIFI_SUCCESS)
    if base["message"]:  # "New Ap, SSID: <s>, PW: <p>" (§3.6) carries the password
        base["message"] = _PASSWORD_IN_MESSAGE.sub("PW: ***", base["message"])
    # the raw fields keep the reply's shape, never the secret it echoes
    raw = base["raw_fields"]
    if "pwd" in raw:
        raw["pwd"] = "***"
    if isinstance(raw.get("msg"), str):
        raw["msg"] = _PASSWORD_IN_MESSAGE.sub("PW: ***", raw["msg"])
    return WifiReply(
        **base,
        outcome=outcome,
        ssids=tuple(parse_bracket_list(ssids)) if ssids is not None else (),
        ssid=_str(f, "ssid"),
        pwd=_str(f, "pwd"),
    )


def _log_level(reply: Reply) -> LogLevelReply:
    message = _str(reply.fields, "msg") or ""
    prefix = "Log Level set to: "
    level = None
    if reply.error is False and message.startswith(prefix):
        level = LogLevel.__members__.get(message[len(prefix) :].strip().upper())
    return LogLevelReply(**_base(reply, reply.error is False), level=level)


def parse_reply(reply: Reply, expected_cmd: str) -> ReplyView:
    """The typed view of ``reply``, which answers the command named ``expected_cmd``.

    Returns :class:`BusyReply` for busy refusals and :class:`ErrorReply` for plain
    failures; otherwise the command's own view (whose ``succeeded`` may still be False,
    e.g. a refused scheduled start, an idle ``stop``, a full WiFi list).  Raises
    :class:`RemoteProtocolError` when a reliable ``cmd`` echo names another command, or a
    success reply lacks its data.  Unknown ``expected_cmd`` gives a generic view.
    """
    echoed = reply.cmd
    if expected_cmd not in _UNRELIABLE_ECHO and echoed != expected_cmd:
        raise RemoteProtocolError(
            f"expected a reply to {expected_cmd!r} but the reply names {echoed!r}: {reply.raw!r}"
        )
    if expected_cmd == "info":
        return _device_info(reply)
    if is_busy(reply):
        ip_match = _BUSY_IP_RE.search(_str(reply.fields, "msg") or "")
        return BusyReply(**_base(reply, False), device_ip=ip_match.group(1) if ip_match else None)
    if is_log_dump(reply):
        return LogDump(
            **_base(reply, True), rows=tuple(parse_log_dump(reply))
        )
    if expected_cmd == "sample":
        return _sample(reply)
    if expected_cmd == "stop":
        return _stop(reply)
    if expected_cmd == "ntp":
        return NtpReply(
            **_base(reply, reply_succeeded("ntp", reply)),
            current_time=_str(reply.fields, "current_time"),
        )
    if expected_cmd in ("addWifi", "delWifi"):
        return _wifi(reply)
    if expected_cmd == "log":
        return _log_level(reply)
    if reply.error is not False:
        return ErrorReply(**_base(reply, False))
    if expected_cmd in _LINE_COMMANDS:
        return _line_values(reply, expected_cmd)
    if expected_cmd == "getPower":
        return _power(reply)
    if expected_cmd == "getEnergy":
        return _energy(reply)
    if expected_cmd == "ade9k":
        return Ade9kReply(
            **_base(reply, True),
            reg_value=_int(reply.fields, "regValue"),
            new_reg_value=_int(reply.fields, "newRegValue"),
        )
    value_key = _MESSAGE_VALUE_KEYS.get(expected_cmd)
    return MessageReply(
        **_base(reply, True), value=_str(reply.fields, value_key) if value_key else None
    )


def parse_log_dump(first_line: str | Reply | UnparsedReply) -> list[str]:
    """Rows of ``getLog``'s first line (§3.14), oldest first.

    Accepts the raw text (with or without ``Info:``), an :class:`UnparsedReply` (the usual
    case: rows are not JSON-escaped) or a :class:`Reply`.  The ``*** LOGFile ***`` markers
    and empty rows are removed; rows are otherwise returned as stored (e.g.
    ``Info:[W]03/02 11:26:20: ...``).  Raises :class:`RemoteProtocolError` if the text is
    not a log dump.
    """
    if isinstance(first_line, Reply):
        message = first_line.fields.get("msg")
        if not isinstance(message, str):
            raise RemoteProtocolError(f"not a getLog dump (no msg): {first_line.raw!r}")
        body = message
    else:
        text = first_line.raw if isinstance(first_line, UnparsedReply) else first_line
        text = text.rstrip("\r\n")
        if text.startswith("Info:"):
            text = text[len("Info:") :]
        start = text.find('"msg":"')
        if start < 0:
            raise RemoteProtocolError(f"not a getLog dump (no msg): {text[:80]!r}")
        body = text[start + len('"msg":"') :]
        if body.endswith('"}'):
            body = body[:-2]
    body = body.strip()
    if not body.startswith(LOG_MARKER):
        raise RemoteProtocolError(f"not a getLog dump (no {LOG_MARKER!r}): {body[:80]!r}")
    body = body[len(LOG_MARKER) :]
    if body.rstrip().endswith(LOG_MARKER):
        body = body.rstrip()[: -len(LOG_MARKER)]
    return [row for row in (r.strip() for r in body.split(LOG_SEPARATOR)) if row]
