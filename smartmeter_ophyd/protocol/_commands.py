"""Every firmware 2.2 command as a validated, frozen value that encodes itself.

One class per wire ``cmd`` (protocol.md §3).  Construction validates the arguments and
raises :class:`CommandError` for anything the firmware would reject *or silently mishandle*
(overflowing buffers, inverted defaults, broken transports): we never send something we
know to be wrong.  Messages name the parameter, the value given and what is allowed.

``encode()`` yields one line: compact JSON (real JSON booleans, §2.7) + ``\\n``.  Arguments
go either into ``payload`` or at the top level, exactly as the firmware reads them (§3's
table) -- the split is not uniform, so each class owns it.

Each class also carries *reply expectations* as class-level data, used by the client to
match replies to requests (§2.8, §2.9):

``expects_reply``
    A JSON reply with the ``error``/``cmd`` envelope follows on success.  False for
    ``info`` (answered by the info line itself, whose ``cmd`` is ``"info"``),
    ``reqSamples`` (silent on success, §5.2 -- an *error* reply can still arrive) and the
    rebooting commands.
``busy_checked``
    The firmware answers the busy reply (§2.8) while a sampling session runs.
``reply_cmd_reliable``
    The reply echoes the command name in ``cmd``.  False where the echo is corrupted
    (§2.9): ``calibration``, ``dailyRestart``, ``ade9k``, ``getLog``.
``error_inverted``
    The ``error`` flag means success (``ntp``, ``addWifi``; §3.6, §3.7): judge by ``msg``.
``reboots``
    The device reboots at once and every connection dies without a reply (§3.15).
``lines_before_reply``
    Extra ``Info:`` JSON-ish lines sent before the reply (``getLog``'s dump, §3.14).

Limits: this module does not know the meter's state (busy, idle, NTP-synced) nor the
time; :func:`check_start_window` takes "now" from the caller.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from ._errors import CommandError
from ._events import LogLevel
from ._measures import (
    REQ_SAMPLES_MAX,
    REQ_SAMPLES_MIN,
    Measures,
    Transport,
    max_request_samples,
    measures_from_input,
    rate_problem,
)
from ._wire import COMMAND_MAX_SIZE

PROBE: Final = b"?\n"
"""Answered with ``Info:Setup done`` and nothing else (§2.2)."""
KEEPALIVE: Final = b"!\n"
"""Ignored by the firmware, no reply (§2.2)."""

MAX_NAME_BYTES: Final = 19
"""mDNS name: 20-24 bytes pass the firmware check but overflow the 20-byte field (§3.2)."""
MAX_MQTT_SERVER_BYTES: Final = 16
MAX_STREAM_SERVER_BYTES: Final = 16
MAX_TIME_SERVER_BYTES: Final = 24
MAX_WIFI_FIELD_BYTES: Final = 19
"""SSID and password must each be shorter than 20 bytes (§3.6)."""
CALIBRATION_MIN: Final = 0.5
CALIBRATION_MAX: Final = 2.0
START_WINDOW_MIN_S: Final = 0.5
START_WINDOW_MAX_S: Final = 20.0
START_RECOMMENDED_LEAD_S: Final = 1.0
"""Send a scheduled start at least this far ahead: the reply alone can take ~0.4 s (§6.4)."""

_E = TypeVar("_E", bound=enum.Enum)


# ------------------------------------------------------------------------ validation


def _fail(cmd: str, param: str, value: Any, allowed: str) -> CommandError:
    return CommandError(f"{cmd}: {param}={value!r} is not allowed; {allowed}")


class _Hidden:
    """Stands in for a secret in error messages."""

    def __repr__(self) -> str:
        return "<hidden>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(cmd: str, param: str, value: Any, lo: int, hi: int, why: str = "") -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise _fail(cmd, param, value, f"allowed: integers {lo}..{hi}{why}")
    return int(value)


def _check_bool(cmd: str, param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(
            cmd,
            param,
            value,
            "allowed: True or False (the firmware reads any string as true, §2.7)",
        )
    return value


def _check_text(
    cmd: str,
    param: str,
    value: Any,
    max_bytes: int,
    *,
    why: str,
    allow_empty: bool = False,
    secret: bool = False,
) -> str:
    """A user string the firmware copies into a fixed field and uses as printf format.

    A ``secret`` (a WiFi password) is never quoted in the error: only its size is.
    """
    shown: Any = _Hidden() if secret else value
    if not isinstance(value, str):
        raise _fail(cmd, param, shown, f"allowed: a string of at most {max_bytes} bytes")
    size = len(value.encode("utf-8"))
    if size > max_bytes or (size == 0 and not allow_empty):
        low = 0 if allow_empty else 1
        raise _fail(
            cmd, param, shown, f"allowed: {low}..{max_bytes} bytes (UTF-8), got {size}{why}"
        )
    if "%" in value:
        raise _fail(
            cmd,
            param,
            shown,
            "allowed: any text without '%' (the firmware uses it as a printf format, §12 #35)",
        )
    if any(ord(ch) < 0x20 for ch in value):
        raise _fail(cmd, param, shown, "allowed: printable text without control characters")
    return value


def _coerce_enum(cmd: str, param: str, value: Any, enum_type: type[_E]) -> _E:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(member.value) for member in enum_type)
        raise _fail(cmd, param, value, f"allowed: {enum_type.__name__} ({allowed})") from None


def _coerce_measures(cmd: str, value: Any) -> Measures:
    if isinstance(value, Measures):
        return value
    mode = measures_from_input(value) if isinstance(value, str) else None
    if mode is None:
        allowed = ", ".join(m.name for m in Measures)
        raise _fail(
            cmd,
            "measures",
            value,
            f"allowed: a Measures member ({allowed}) or a firmware input string "
            "such as 'v,i_L1' or 'p,q' (§4.2)",
        )
    return mode


def _check_finite(cmd: str, param: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(cmd, param, value, "allowed: a finite number")
    return float(value)


# --------------------------------------------------------------------------- the base


class Command:
    """Base of every command; subclasses are frozen, slotted dataclasses.

    Class-level reply expectations are documented in the module docstring.
    """

    __slots__ = ()

    name: ClassVar[str]
    """The wire ``cmd``."""
    expects_reply: ClassVar[bool] = True
    busy_checked: ClassVar[bool] = True
    reply_cmd_reliable: ClassVar[bool] = True
    error_inverted: ClassVar[bool] = False
    reboots: ClassVar[bool] = False
    lines_before_reply: ClassVar[int] = 0

    def _top_level(self) -> dict[str, Any]:
        """Arguments the firmware reads next to ``cmd``."""
        return {}

    def _payload(self) -> dict[str, Any] | None:
        """Arguments the firmware reads from ``payload`` (None: no payload key)."""
        return None

    def to_json(self) -> dict[str, Any]:
        """The request object, keys in wire order (``cmd`` first)."""
        obj: dict[str, Any] = {"cmd": self.name}
        obj.update(self._top_level())
        payload = self._payload()
        if payload is not None:
            obj["payload"] = payload
        return obj

    def encode(self) -> bytes:
        """One command line: compact JSON + ``\\n`` (send it in one write, §2.1)."""
        line = json.dumps(
            self.to_json(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
        if len(line) >= COMMAND_MAX_SIZE:
            raise CommandError(
                f"{self.name}: encoded command is {len(line)} bytes; the firmware truncates "
                f"lines at {COMMAND_MAX_SIZE} bytes (§2.2)"
            )
        return line + b"\n"


# ------------------------------------------------------------------- sampling (§4, §5)


@dataclass(frozen=True, slots=True)
class Sample(Command):
    """Start a sampling session (§4.1): ``payload{type, rate, measures?, prefix?, port?,
    flowCtr?, slot?, time?}``.

    Defaults are not sent (Appendix B: ``{"cmd":"sample","payload":{"type":"TCP","rate":4000}}``);
    ``ntpConf`` is never sent (ignored by the firmware, §6.3).  Rejected here besides the
    firmware's own checks: FFMPEG (§7.3), UDP ports > 65535 (they wrap), slots with
    ``slots == 0`` (never sends, §5.3) or with UDP/MQTT (slot data goes to the TCP sink,
    §12 #27), non-integer start times (truncated), scheduled starts of latched modes
    (they stream raw waveform data under latched labels, §6.4).  Bursty rates such as 1 Hz
    or 6400 Hz are accepted, as by the firmware: see :func:`decimation`.
    """

    transport: Transport = Transport.TCP
    rate: int = 8000
    measures: Measures = Measures.VI
    prefix: bool = True
    port: int | None = None
    flow_control: bool = False
    slot: tuple[int, int] | None = None
    start_time: int | None = None

    name: ClassVar[str] = "sample"

    def __post_init__(self) -> None:
        cmd = self.name
        transport = _coerce_enum(cmd, "transport", self.transport, Transport)
        if transport is Transport.FFMPEG:
            raise _fail(
                cmd,
                "transport",
                transport,
                "FFMPEG is broken in firmware 2.2 (data is not redirected, the meter may "
                "crash, §7.3); connect to the raw stream on port 54322 instead. "
                "Allowed: TCP, UDP, Serial, MQTT",
            )
        object.__setattr__(self, "transport", transport)
        measures = _coerce_measures(cmd, self.measures)
        object.__setattr__(self, "measures", measures)
        problem = rate_problem(self.rate, measures)
        if problem is not None:
            raise _fail(cmd, "rate", self.rate, problem)
        _check_bool(cmd, "prefix", self.prefix)
        _check_bool(cmd, "flow_control", self.flow_control)
        if transport is Transport.UDP:
            if self.port is None:
                raise _fail(cmd, "port", None, "UDP sampling needs a port in 1..65535")
            _check_int(cmd, "port", self.port, 1, 65535, " (UDP destination port)")
        elif self.port is not None:
            raise _fail(
                cmd, "port", self.port, f"a port is only used with UDP, not {transport.value}"
            )
        if self.slot is not None:
            self._check_slot(transport)
        if self.start_time is not None:
            if not _is_int(self.start_time) or self.start_time <= 0:
                raise _fail(
                    cmd,
                    "start_time",
                    self.start_time,
                    "allowed: a positive integer unix time in seconds "
                    "(the firmware truncates fractions, §6.4)",
                )
            if measures.latched:
                raise _fail(
                    cmd,
                    "start_time",
                    self.start_time,
                    f"a scheduled start is not allowed with latched measures {measures.name}: "
                    "the firmware streams raw waveform data under latched labels (§6.4)",
                )

    def _check_slot(self, transport: Transport) -> None:
        cmd = self.name
        slot = self.slot
        if (
            not isinstance(slot, tuple | list)
            or len(slot) != 2
            or not all(_is_int(v) for v in slot)
        ):
            raise _fail(cmd, "slot", slot, "allowed: a pair (slot, slots) of integers")
        index, count = slot
        if count < 1 or not 0 <= index < count:
            raise _fail(
                cmd,
                "slot",
                slot,
                "allowed: slots >= 1 and 0 <= slot < slots (slots 0 never sends, §5.3)",
            )
        if transport not in (Transport.TCP, Transport.SERIAL):
            raise _fail(
                cmd,
                "slot",
                slot,
                f"slots only work with TCP or Serial; with {transport.value} the firmware "
                "writes slot data to the TCP/serial sink (§12 #27)",
            )
        object.__setattr__(self, "slot", (int(index), int(count)))

    def _payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"type": self.transport.value, "rate": self.rate}
        if self.measures.request is not None:
            payload["measures"] = self.measures.request
        if not self.prefix:
            payload["prefix"] = False
        if self.port is not None:
            payload["port"] = self.port
        if self.flow_control:
            payload["flowCtr"] = True
        if self.slot is not None:
            payload["slot"] = list(self.slot)
        if self.start_time is not None:
            payload["time"] = self.start_time
        return payload


def check_start_window(start_time: float, now: float) -> None:
    """Raise unless ``start_time`` lies in the firmware's scheduling window from ``now``.

    The firmware accepts 500 ms < delta <= 20 s, measured *after* its own NTP sync, which
    can take ~0.4 s (§6.4); ``now`` comes from the caller (the codec reads no clock).
    """
    lead = start_time - now
    if not START_WINDOW_MIN_S < lead <= START_WINDOW_MAX_S:
        raise CommandError(
            f"sample: start_time={start_time!r} is {lead:.3f} s from now; allowed: more than "
            f"{START_WINDOW_MIN_S} s and at most {START_WINDOW_MAX_S:.0f} s ahead "
            f"(recommended >= {START_RECOMMENDED_LEAD_S:.0f} s: the reply can take ~0.4 s, §6.4)"
        )


@dataclass(frozen=True, slots=True)
class Cts(Command):
    """Set ready-to-send (§5.1): top-level ``value``."""

    value: bool

    name: ClassVar[str] = "cts"
    busy_checked = False

    def __post_init__(self) -> None:
        _check_bool(self.name, "value", self.value)

    def _top_level(self) -> dict[str, Any]:
        return {"value": self.value}


@dataclass(frozen=True, slots=True)
class RequestSamples(Command):
    """Request one frame of ``samples`` samples (§5.2): top-level ``samples``.

    ``measures`` is the running session's mode; it is not sent, only used to check the
    device's 1029-byte send buffer.  Silent on success; switches flow control off for good.
    """

    samples: int
    measures: Measures

    name: ClassVar[str] = "reqSamples"
    expects_reply = False
    busy_checked = False

    def __post_init__(self) -> None:
        cmd = self.name
        measures = _coerce_measures(cmd, self.measures)
        object.__setattr__(self, "measures", measures)
        if measures.latched:
            raise _fail(
                cmd,
                "measures",
                measures,
                "reqSamples does not work in latched sampling (§5.2); "
                "allowed: VI, VI_L1, VI_L2, VI_L3",
            )
        limit = min(REQ_SAMPLES_MAX, max_request_samples(measures))
        _check_int(
            cmd,
            "samples",
            self.samples,
            REQ_SAMPLES_MIN,
            limit,
            f" for {measures.name}: the firmware rejects < {REQ_SAMPLES_MIN}, and more than "
            f"{limit} samples overflow its 1029-byte send buffer (device memory fault, §5.2)",
        )

    def _top_level(self) -> dict[str, Any]:
        return {"samples": self.samples}


@dataclass(frozen=True, slots=True)
class Stop(Command):
    """Stop sampling (§4.8); flushes the buffered tail, then replies (``error`` last)."""

    name: ClassVar[str] = "stop"
    busy_checked = False


@dataclass(frozen=True, slots=True)
class Info(Command):
    """Request the info line (§2.5); the answer is the info message (``cmd`` ``info``)."""

    name: ClassVar[str] = "info"
    busy_checked = False
    expects_reply = False


# ------------------------------------------------------------------------ settings (§3)


@dataclass(frozen=True, slots=True)
class SetLogLevel(Command):
    """Per-connection log level (§3.1): top-level ``level`` (lower-case name)."""

    level: LogLevel

    name: ClassVar[str] = "log"
    busy_checked = False

    def __post_init__(self) -> None:
        level = self.level
        if isinstance(level, str) and not isinstance(level, LogLevel):
            level = LogLevel.__members__.get(level.upper(), level)
        if not isinstance(level, LogLevel):
            allowed = ", ".join(member.wire_name for member in LogLevel)
            raise _fail(self.name, "level", self.level, f"allowed: {allowed}")
        object.__setattr__(self, "level", level)

    def _top_level(self) -> dict[str, Any]:
        return {"level": self.level.wire_name}


@dataclass(frozen=True, slots=True)
class SetName(Command):
    """Rename the meter (mDNS/MQTT name, §3.2): ``payload{name}``."""

    device_name: str

    name: ClassVar[str] = "mdns"

    def __post_init__(self) -> None:
        _check_text(
            self.name,
            "name",
            self.device_name,
            MAX_NAME_BYTES,
            why=" (20-24 bytes overflow the stored field, §3.2)",
        )

    def _payload(self) -> dict[str, Any]:
        return {"name": self.device_name}


@dataclass(frozen=True, slots=True)
class SetMqttServer(Command):
    """MQTT broker address (§3.3): ``payload{server}``; ``"-"`` disables MQTT."""

    server: str

    name: ClassVar[str] = "mqttServer"

    def __post_init__(self) -> None:
        _check_text(self.name, "server", self.server, MAX_MQTT_SERVER_BYTES, why=" (§3.3)")

    def _payload(self) -> dict[str, Any]:
        return {"server": self.server}


@dataclass(frozen=True, slots=True)
class SetStreamServer(Command):
    """Host the meter dials on port 54322 (§3.4, §7.2): ``payload{server}``; ``"-"`` unsets."""

    server: str

    name: ClassVar[str] = "streamServer"

    def __post_init__(self) -> None:
        _check_text(self.name, "server", self.server, MAX_STREAM_SERVER_BYTES, why=" (§3.4)")

    def _payload(self) -> dict[str, Any]:
        return {"server": self.server}


@dataclass(frozen=True, slots=True)
class SetTimeServer(Command):
    """NTP server (§3.5): ``payload{server}``; the firmware then syncs (blocking)."""

    server: str

    name: ClassVar[str] = "timeServer"

    def __post_init__(self) -> None:
        _check_text(self.name, "server", self.server, MAX_TIME_SERVER_BYTES, why=" (§3.5)")

    def _payload(self) -> dict[str, Any]:
        return {"server": self.server}


@dataclass(frozen=True, slots=True)
class AddWifi(Command):
    """Add a WiFi network to the stored list (§3.6; no effect on the Ethernet build).

    ``payload{ssid,pwd}``; empty ``pwd`` for open networks.  The reply's error flag is
    inverted.
    """

    ssid: str
    pwd: str = field(default="", repr=False)  # a secret: never in reprs or logs

    name: ClassVar[str] = "addWifi"
    error_inverted = True

    def __post_init__(self) -> None:
        _check_text(self.name, "ssid", self.ssid, MAX_WIFI_FIELD_BYTES, why=" (must be < 20, §3.6)")
        if self.ssid == "-":
            raise _fail(self.name, "ssid", self.ssid, "'-' marks unused slots (§3.6)")
        _check_text(
            self.name,
            "pwd",
            self.pwd,
            MAX_WIFI_FIELD_BYTES,
            why=" (must be < 20, §3.6)",
            allow_empty=True,
            secret=True,
        )

    def _payload(self) -> dict[str, Any]:
        return {"ssid": self.ssid, "pwd": self.pwd}


@dataclass(frozen=True, slots=True)
class DelWifi(Command):
    """Remove a WiFi network (§3.6): ``payload{ssid}``."""

    ssid: str

    name: ClassVar[str] = "delWifi"

    def __post_init__(self) -> None:
        _check_text(self.name, "ssid", self.ssid, MAX_WIFI_FIELD_BYTES, why=" (must be < 20, §3.6)")
        if self.ssid == "-":
            raise _fail(
                self.name,
                "ssid",
                self.ssid,
                "'-' matches the unused placeholder slots and can corrupt the list (§3.6)",
            )

    def _payload(self) -> dict[str, Any]:
        return {"ssid": self.ssid}


@dataclass(frozen=True, slots=True)
class NtpSync(Command):
    """Synchronise the clock (§3.7): ``payload{bg:true}`` only when ``background``.

    Allowed while sampling (triggers the rate correction, §6.5).  Error flag inverted.
    """

    background: bool = False

    name: ClassVar[str] = "ntp"
    busy_checked = False
    error_inverted = True

    def __post_init__(self) -> None:
        _check_bool(self.name, "background", self.background)

    def _payload(self) -> dict[str, Any] | None:
        return {"bg": True} if self.background else None


@dataclass(frozen=True, slots=True)
class SetCalibration(Command):
    """Calibration factors ``[v1,i1,v2,i2,v3,i3]`` (§3.8): top-level ``cal``.

    Stored and reported, never applied to measurements (§12 #14).  Like the firmware,
    negative factors pass when ``|x|`` is within 0.5..2.0.
    """

    factors: tuple[float, float, float, float, float, float]

    name: ClassVar[str] = "calibration"
    reply_cmd_reliable = False

    def __post_init__(self) -> None:
        factors = self.factors
        if not isinstance(factors, Sequence) or isinstance(factors, str) or len(factors) != 6:
            raise _fail(
                self.name, "factors", factors, "allowed: exactly 6 numbers [v1,i1,v2,i2,v3,i3]"
            )
        checked = []
        for index, value in enumerate(factors):
            number = _check_finite(self.name, f"factors[{index}]", value)
            if not CALIBRATION_MIN <= abs(number) <= CALIBRATION_MAX:
                raise _fail(
                    self.name,
                    f"factors[{index}]",
                    value,
                    f"allowed: |x| in {CALIBRATION_MIN}..{CALIBRATION_MAX} (§3.8)",
                )
            checked.append(number)
        object.__setattr__(self, "factors", tuple(checked))

    def _top_level(self) -> dict[str, Any]:
        return {"cal": list(self.factors)}


@dataclass(frozen=True, slots=True)
class ResetEnergy(Command):
    """Reset the energy counters (§3.9): top-level ``energy[3]?`` (Wh) and ``ts?`` (unix s)."""

    energy: tuple[float, float, float] | None = None
    ts: int | None = None

    name: ClassVar[str] = "resetEnergy"

    def __post_init__(self) -> None:
        if self.energy is not None:
            energy = self.energy
            if not isinstance(energy, Sequence) or isinstance(energy, str) or len(energy) != 3:
                raise _fail(self.name, "energy", energy, "allowed: exactly 3 numbers (Wh, L1..L3)")
            values = tuple(
                _check_finite(self.name, f"energy[{i}]", v) for i, v in enumerate(energy)
            )
            object.__setattr__(self, "energy", values)
        if self.ts is not None and (not _is_int(self.ts) or self.ts < 0):
            raise _fail(self.name, "ts", self.ts, "allowed: a non-negative integer unix time (s)")

    def _top_level(self) -> dict[str, Any]:
        keys: dict[str, Any] = {}
        if self.energy is not None:
            keys["energy"] = list(self.energy)
        if self.ts is not None:
            keys["ts"] = self.ts
        return keys


@dataclass(frozen=True, slots=True)
class SetDailyRestart(Command):
    """Daily reboot at local ``hour:minute`` (§3.12): top-level ``hour``, ``minute``.

    ``hour = -1`` disables.  Fires also while sampling (§12 #34).
    """

    hour: int
    minute: int

    name: ClassVar[str] = "dailyRestart"
    reply_cmd_reliable = False

    def __post_init__(self) -> None:
        _check_int(self.name, "hour", self.hour, -1, 23, " (-1 disables)")
        _check_int(self.name, "minute", self.minute, -1, 59)
        if self.hour >= 0 and self.minute < 0:
            raise _fail(
                self.name,
                "minute",
                self.minute,
                "with hour >= 0 the minute must be 0..59 (-1 would never fire); "
                "use hour=-1 to disable",
            )

    @classmethod
    def disabled(cls) -> SetDailyRestart:
        return cls(hour=-1, minute=-1)

    def _top_level(self) -> dict[str, Any]:
        return {"hour": self.hour, "minute": self.minute}


@dataclass(frozen=True, slots=True)
class Ade9kAccess(Command):
    """Raw ADE9000 register access (§3.13): top-level ``address``, ``size``, ``write?``.

    Addresses and values go out as lower-case ``0x`` hex strings (the firmware insists).
    """

    address: int
    size: int = 32
    write: int | None = None

    name: ClassVar[str] = "ade9k"
    reply_cmd_reliable = False

    def __post_init__(self) -> None:
        _check_int(self.name, "address", self.address, 0, 0xFFFF)
        if not _is_int(self.size) or self.size not in (16, 32):
            raise _fail(self.name, "size", self.size, "allowed: 16 or 32 (bits)")
        if self.write is not None:
            _check_int(
                self.name, "write", self.write, 0, (1 << self.size) - 1, f" ({self.size}-bit)"
            )

    def _top_level(self) -> dict[str, Any]:
        keys: dict[str, Any] = {"address": f"0x{self.address:x}", "size": self.size}
        if self.write is not None:
            keys["write"] = f"0x{self.write:x}"
        return keys


# ------------------------------------------------------------------ argument-less ones


@dataclass(frozen=True, slots=True)
class GetPower(Command):
    """Active, reactive and 'apparent' power per line (§3.10; apparent is really reactive)."""

    name: ClassVar[str] = "getPower"


@dataclass(frozen=True, slots=True)
class GetVoltage(Command):
    """RMS voltage per line in V (§3.10)."""

    name: ClassVar[str] = "getVoltage"


@dataclass(frozen=True, slots=True)
class GetCurrent(Command):
    """RMS current per line in mA (§3.10)."""

    name: ClassVar[str] = "getCurrent"


@dataclass(frozen=True, slots=True)
class GetEnergy(Command):
    """Energy per line in Wh since the last reset (§3.10); resets the ADE accumulators (§12 #11)."""

    name: ClassVar[str] = "getEnergy"


@dataclass(frozen=True, slots=True)
class GetPeriod(Command):
    """Line *frequency* in Hz despite the name (§3.10, §12 #13)."""

    name: ClassVar[str] = "getPeriod"


@dataclass(frozen=True, slots=True)
class GetPhaseAngle(Command):
    """Voltage-current phase angle per line in degrees (§3.10)."""

    name: ClassVar[str] = "getPhaseAngle"


@dataclass(frozen=True, slots=True)
class ClearLog(Command):
    """Delete the stored log files (§3.11)."""

    name: ClassVar[str] = "clearLog"


@dataclass(frozen=True, slots=True)
class GetLog(Command):
    """Dump the stored WARNING/ERROR log (§3.14): one dump line, then a reply with a garbled cmd."""

    name: ClassVar[str] = "getLog"
    reply_cmd_reliable = False
    lines_before_reply = 1


@dataclass(frozen=True, slots=True)
class Restart(Command):
    """Reboot now; no reply, connections die (§3.15)."""

    name: ClassVar[str] = "restart"
    busy_checked = False
    expects_reply = False
    reboots = True


@dataclass(frozen=True, slots=True)
class FactoryReset(Command):
    """Restore defaults (incl. the name), persist and reboot; no reply (§3.15)."""

    name: ClassVar[str] = "factoryReset"
    busy_checked = False
    expects_reply = False
    reboots = True
    FACTORY_NAME: ClassVar[str] = "smartmeterX"
    """The name the meter comes back with (§3.15)."""


@dataclass(frozen=True, slots=True)
class BasicReset(Command):
    """Restore defaults except the name, persist and reboot; no reply (§3.15)."""

    name: ClassVar[str] = "basicReset"
    busy_checked = False
    expects_reply = False
    reboots = True


COMMANDS: Final[dict[str, type[Command]]] = {
    cls.name: cls
    for cls in (
        Sample,
        Stop,
        Cts,
        RequestSamples,
        Info,
        SetLogLevel,
        SetName,
        SetMqttServer,
        SetStreamServer,
        SetTimeServer,
        AddWifi,
        DelWifi,
        NtpSync,
        SetCalibration,
        ResetEnergy,
        GetPower,
        GetVoltage,
        GetCurrent,
        GetEnergy,
        GetPeriod,
        GetPhaseAngle,
        ClearLog,
        GetLog,
        SetDailyRestart,
        Ade9kAccess,
        Restart,
        FactoryReset,
        BasicReset,
    )
}
"""Every firmware command class by wire name (28 entries)."""
