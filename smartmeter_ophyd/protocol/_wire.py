"""Byte-level encoders and the firmware's view of input lines.

Server role (the emulator) encodes with these functions; the client decodes what they
produce with :mod:`._decoder`.  Clauses: §2.2 (input framing), §2.3 (output framing),
§2.4 (log lines), §2.7 (malformed input, ArduinoJson coercion), §4.6 (frame layout).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._events import LogLevel

INFO_PREFIX: Final = b"Info:"
DATA_PREFIX: Final = b"Data:"
CRLF: Final = b"\r\n"
FRAME_HEADER: Final = struct.Struct("<5sHI")
"""``Data:`` + payload length ``<H`` + packet number ``<I`` (§4.6)."""
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size  # 11

COMMAND_MAX_SIZE: Final = 600
"""The firmware reads a command into a 600-byte buffer and truncates the rest (§2.2)."""

MALFORMED_ECHO_CHARS: Final = 30


# ------------------------------------------------------------------ JSON as ArduinoJson 6


def _format_number(value: float) -> str:
    # ArduinoJson prints integral doubles without a fraction (1.0 -> "1") and others with
    # up to 9 significant digits; NaN/inf become null.
    if math.isnan(value) or math.isinf(value):
        return "null"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.9g}"
    return text


def _encode(obj: Any, out: list[str]) -> None:
    if obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(_format_number(obj))
    elif isinstance(obj, str):
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, dict):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=False))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as firmware JSON")


def arduino_json(obj: Any) -> str:
    """Serialise like ArduinoJson 6: compact, insertion order, integral floats as ints."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out)


# ------------------------------------------------------------------------- output lines


def encode_reply(fields: dict[str, Any]) -> bytes:
    """``Info:{...}`` + CRLF, keys in the given order."""
    return INFO_PREFIX + arduino_json(fields).encode() + CRLF


def encode_raw_info_line(text: str) -> bytes:
    """``Info:`` + text + CRLF, for lines whose JSON the firmware builds by hand (getLog)."""
    return INFO_PREFIX + text.encode("utf-8", "replace") + CRLF


def encode_log_line(level: LogLevel, short_time: str, text: str) -> bytes:
    """``Info:[X]MM/DD HH:MM:SS: text`` + CRLF (§2.4).  Empty text = lifeness line (§2.6)."""
    return f"Info:[{level.tag}]{short_time}: {text}".encode("utf-8", "replace") + CRLF


def encode_plain_line(text: str) -> bytes:
    """``Info:`` + text + CRLF, e.g. ``Info:Setup done``."""
    return INFO_PREFIX + text.encode("utf-8", "replace") + CRLF


# ------------------------------------------------------------------------------- frames


def encode_frame(packet: int, payload: bytes, *, prefix: bool = True, serial: bool = False) -> bytes:
    """One data frame (§4.6); Serial appends CRLF even without prefix (§4.12)."""
    head = FRAME_HEADER.pack(DATA_PREFIX, len(payload), packet & 0xFFFFFFFF) if prefix else b""
    return head + payload + (CRLF if serial else b"")


def encode_frames(
    first_packet: int,
    samples: npt.NDArray[np.float32],
    samples_per_frame: int,
    *,
    prefix: bool = True,
    serial: bool = False,
) -> bytes:
    """Many equal frames at once (the emulator's hot path), vectorised with numpy.

    ``samples`` has shape ``(n_frames * samples_per_frame, channels)``; a partial last
    frame is not allowed here (the firmware only sends full chunks while streaming).
    """
    values = np.ascontiguousarray(samples, dtype="<f4")
    n_samples, channels = values.shape
    if n_samples % samples_per_frame:
        raise ValueError("samples do not fill a whole number of frames")
    n_frames = n_samples // samples_per_frame
    payload_len = samples_per_frame * channels * 4
    head_len = FRAME_HEADER_SIZE if prefix else 0
    tail_len = len(CRLF) if serial else 0
    stride = head_len + payload_len + tail_len
    out = np.empty((n_frames, stride), dtype=np.uint8)
    if prefix:
        out[:, 0:5] = np.frombuffer(DATA_PREFIX, dtype=np.uint8)
        out[:, 5:7] = np.frombuffer(struct.pack("<H", payload_len), dtype=np.uint8)
        packets = (np.arange(n_frames, dtype=np.uint64) + first_packet) & 0xFFFFFFFF
        out[:, 7:11] = packets.astype("<u4").view(np.uint8).reshape(n_frames, 4)
    out[:, head_len : head_len + payload_len] = values.view(np.uint8).reshape(n_frames, payload_len)
    if serial:
        out[:, -2:] = np.frombuffer(CRLF, dtype=np.uint8)
    return out.tobytes()


# ------------------------------------------------------------------- input (server role)


class InputLine:
    """Base of what the firmware makes of one received command line (§2.2)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Probe(InputLine):
    """A line starting with ``?``: answered ``Info:Setup done``, nothing else (§2.2)."""


@dataclass(frozen=True, slots=True)
class KeepAlive(InputLine):
    """A line starting with ``!``: ignored, no reply (§2.2)."""


@dataclass(frozen=True, slots=True)
class JsonInput(InputLine):
    """Valid JSON.  ``value`` may be any JSON type; a reply needs a dict with a string cmd."""

    value: Any

    @property
    def cmd(self) -> str | None:
        if isinstance(self.value, dict):
            cmd = self.value.get("cmd")
            return cmd if isinstance(cmd, str) else None
        return None


@dataclass(frozen=True, slots=True)
class MalformedInput(InputLine):
    """Invalid JSON (including the empty line): logged at ERROR, no reply (§2.7)."""

    text: str

    @property
    def log_text(self) -> str:
        """``deserializeJson() failed: `` + the sanitised first 30 characters."""
        head = self.text[:MALFORMED_ECHO_CHARS]
        for ch in '\r\n"{}':
            head = head.replace(ch, "_")
        return f"deserializeJson() failed: {head}"


def parse_input_line(line: bytes) -> InputLine:
    """Classify one command line as the firmware does.

    ``line`` is what the firmware read up to (not including) ``\\n``; it is truncated to the
    600-byte command buffer first.  A trailing ``\\r`` is whitespace to the JSON parser.
    """
    data = line[:COMMAND_MAX_SIZE]
    if data[:1] == b"?":
        return Probe()
    if data[:1] == b"!":
        return KeepAlive()
    text = data.decode("utf-8", "replace")
    try:
        return JsonInput(json.loads(text))
    except ValueError:
        return MalformedInput(text.rstrip("\r"))


# ArduinoJson 6 conversions (§2.7): numbers given as strings are parsed, any string is
# ``true`` as a bool, missing values read as 0 / false / null.


def arduino_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return True
    return False


def arduino_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except ValueError:
            return 0
    return 0


def arduino_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return 0.0
    return 0.0


def arduino_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
