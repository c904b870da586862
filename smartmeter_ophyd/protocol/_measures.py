"""Tables derived from one definition: measures modes, rates, chunk sizes, send buffer.

Everything here is data plus pure functions of it.  The emulator produces and the client
decodes with the same table, so a disagreement between them is impossible by construction.

protocol.md clauses: §4.2 (measures), §4.3 (rates and decimation), §4.5 (chunk size),
§5.2 (reqSamples send buffer), §4.10 (ring buffer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

FLOAT_BYTES: Final = 4
"""Every sample value is an IEEE-754 float32, little-endian (§4.6; the README is wrong)."""

SAMPLE_DTYPE: Final = "<f4"

RING_BUFFER_BYTES: Final = 3_670_016
"""Device ring buffer (3.5 MiB PSRAM); overflow reboots the meter (§4.10)."""

SEND_BUFFER_PAYLOAD_BYTES: Final = 1029
"""Largest reqSamples payload that fits the 1040-byte send buffer with its 11-byte header (§5.2)."""

REQ_SAMPLES_MIN: Final = 11
REQ_SAMPLES_MAX: Final = 2000
"""Firmware-accepted reqSamples range (§5.2: ``N <= 10`` or ``N > 2000`` is rejected)."""

LATCHED_MAX_RATE: Final = 50
"""Latched modes (p,q and v,i_RMS) accept at most 50 Hz (§4.1 step 5)."""

MAX_RATE: Final = 32_000

MAX_CHUNK_BYTES: Final = 1024
UDP_MAX_CHUNK_BYTES: Final = 512
SERIAL_CHUNK_BYTES: Final = 128


class Measures(enum.Enum):
    """The six measures modes of firmware 2.2 (§4.2)."""

    VI = "v,i,v,i,v,i"
    """Instantaneous voltage and current of all three lines (the default)."""
    VI_L1 = "v,i_L1"
    """Instantaneous voltage and current of L1 (also requested as ``"v,i"``)."""
    VI_L2 = "v,i_L2"
    VI_L3 = "v,i_L3"
    PQ = "p,q"
    """Active and reactive power per line, latched (<= 50 Hz)."""
    VI_RMS = "v,i_RMS"
    """RMS voltage and current per line, latched (<= 50 Hz)."""

    @property
    def spec(self) -> MeasuresSpec:
        return MEASURES_TABLE[self]

    @property
    def channels(self) -> tuple[str, ...]:
        return MEASURES_TABLE[self].channels

    @property
    def units(self) -> tuple[str, ...]:
        return MEASURES_TABLE[self].units

    @property
    def values_per_sample(self) -> int:
        return len(MEASURES_TABLE[self].channels)

    @property
    def bytes_per_sample(self) -> int:
        return self.values_per_sample * FLOAT_BYTES

    @property
    def latched(self) -> bool:
        return MEASURES_TABLE[self].latched

    @property
    def reported(self) -> str:
        """The ``measures`` string the firmware puts in the sample reply."""
        return MEASURES_TABLE[self].reported

    @property
    def request(self) -> str | None:
        """The ``measures`` string to send (None: omit the key; the firmware default is VI)."""
        return MEASURES_TABLE[self].request


@dataclass(frozen=True, slots=True)
class MeasuresSpec:
    """One row of §4.2."""

    request: str | None
    """What the client sends (None = omit, the firmware's 3-phase default)."""
    accepted_inputs: tuple[str, ...]
    """Every input string the firmware maps to this mode."""
    reported: str
    """The ``measures`` value in the sample reply."""
    units: tuple[str, ...]
    """One unit per channel, as in the reply's ``unit`` string."""
    channels: tuple[str, ...]
    """Channel names in wire order."""
    latched: bool

    @property
    def unit_string(self) -> str:
        return ",".join(self.units)


MEASURES_TABLE: Final[dict[Measures, MeasuresSpec]] = {
    Measures.VI: MeasuresSpec(
        request=None,
        accepted_inputs=("v,i,v,i,v,i",),
        reported="v,i,v,i,v,i",
        units=("V", "mA", "V", "mA", "V", "mA"),
        channels=("v_l1", "i_l1", "v_l2", "i_l2", "v_l3", "i_l3"),
        latched=False,
    ),
    Measures.VI_L1: MeasuresSpec(
        request="v,i_L1",
        accepted_inputs=("v,i", "v,i_L1"),
        reported="v,i_L1",
        units=("V", "mA"),
        channels=("v_l1", "i_l1"),
        latched=False,
    ),
    Measures.VI_L2: MeasuresSpec(
        request="v,i_L2",
        accepted_inputs=("v,i_L2",),
        reported="v,i_L2",
        units=("V", "mA"),
        channels=("v_l2", "i_l2"),
        latched=False,
    ),
    Measures.VI_L3: MeasuresSpec(
        request="v,i_L3",
        accepted_inputs=("v,i_L3",),
        reported="v,i_L3",
        units=("V", "mA"),
        channels=("v_l3", "i_l3"),
        latched=False,
    ),
    Measures.PQ: MeasuresSpec(
        request="p,q",
        accepted_inputs=("p,q",),
        reported="p,p,p,q,q,q",
        units=("W", "W", "W", "VAR", "VAR", "VAR"),
        channels=("p_l1", "p_l2", "p_l3", "q_l1", "q_l2", "q_l3"),
        latched=True,
    ),
    Measures.VI_RMS: MeasuresSpec(
        request="v,i_RMS",
        accepted_inputs=("v,i_RMS",),
        reported="v,v,v,i,i,i_RMS",
        units=("V", "V", "V", "mA", "mA", "mA"),
        channels=("vrms_l1", "vrms_l2", "vrms_l3", "irms_l1", "irms_l2", "irms_l3"),
        latched=True,
    ),
}

_BY_INPUT: Final[dict[str, Measures]] = {
    text: mode for mode, spec in MEASURES_TABLE.items() for text in spec.accepted_inputs
}
_BY_REPORTED: Final[dict[str, Measures]] = {
    spec.reported: mode for mode, spec in MEASURES_TABLE.items()
}


def measures_from_input(text: str | None) -> Measures | None:
    """Map a ``measures`` request string as the firmware does; None if it would be rejected.

    Absent (``None``) means the 3-phase default.  Note ``"v,i"`` is **L1 only** (§4.2) and
    the long forms ``"p,p,p,q,q,q"``/``"v,v,v,i,i,i_RMS"`` are rejected (§11 #10).
    """
    if text is None:
        return Measures.VI
    return _BY_INPUT.get(text)


def measures_from_reported(text: str) -> Measures:
    """Map the ``measures`` value of a sample reply back to the mode."""
    try:
        return _BY_REPORTED[text]
    except KeyError:
        raise ValueError(f"unknown reported measures {text!r}") from None


# --------------------------------------------------------------------------- rates (§4.3)

ACCEPTED_RATES: Final[tuple[int, ...]] = tuple(r for r in range(1, MAX_RATE + 1) if MAX_RATE % r == 0)
"""The 36 divisors of 32000: the only rates a non-latched session accepts."""


@dataclass(frozen=True, slots=True)
class Decimation:
    """How the firmware turns a requested rate into ADE9000 samples (§4.3)."""

    rate: int
    """Requested (and per-second) sample count."""
    internal_rate: int
    """ADE9000 waveform rate: 8000 (rate <= 8000) or 32000."""
    keep_every: int
    """k: every k-th ADE sample is kept (8-bit wrapped)."""

    @property
    def decimated_rate(self) -> float:
        """Spacing rate of kept samples inside a burst (Hz)."""
        return self.internal_rate / self.keep_every

    @property
    def uniform(self) -> bool:
        """True when the kept samples are evenly spaced at ``rate``."""
        return self.keep_every * self.rate == self.internal_rate


def decimation(rate: int) -> Decimation:
    """The firmware's decimation for an accepted non-latched rate.

    ``k = internal // rate`` is stored in an 8-bit variable, so it wraps modulo 256; at most
    ``rate`` samples are accepted per second.  Rates such as 1, 128 or 6400 are therefore
    *bursty*: the first ``rate`` samples of each second at the decimated rate, then nothing.
    """
    if rate not in ACCEPTED_RATES:
        raise ValueError(f"rate {rate} does not divide 32000")
    internal = 8000 if rate <= 8000 else 32000
    k = (internal // rate) % 256
    return Decimation(rate=rate, internal_rate=internal, keep_every=k)


def rate_problem(rate: int, measures: Measures) -> str | None:
    """Why the firmware would refuse or mishandle ``rate`` for ``measures``; None if fine."""
    if isinstance(rate, bool) or not isinstance(rate, int):
        return f"rate must be an integer, not {rate!r}"
    if rate <= 0:
        return f"rate must be positive, not {rate}"
    if measures.latched:
        if rate > LATCHED_MAX_RATE:
            return (
                f"rate {rate} Hz is above the {LATCHED_MAX_RATE} Hz limit of latched measures "
                f"{measures.request!r}; allowed: 1..{LATCHED_MAX_RATE}"
            )
        return None
    if rate not in ACCEPTED_RATES:
        return (
            f"rate {rate} Hz does not divide 32000; allowed: "
            + ", ".join(str(r) for r in ACCEPTED_RATES)
        )
    return None


# ----------------------------------------------------------------------- chunk size (§4.5)


class Transport(enum.Enum):
    """Sampling sinks of the ``sample`` command (the ``type`` key)."""

    TCP = "TCP"
    UDP = "UDP"
    SERIAL = "Serial"
    MQTT = "MQTT"
    FFMPEG = "FFMPEG"


def _next_power_of_two(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def chunk_size(rate: int, bytes_per_sample: int, transport: Transport = Transport.TCP) -> int:
    """Bytes per full ``Data:`` frame for a session (§4.5, ``calcChunkSize``).

    100 ms of data, clamped to [bytes_per_sample, 1024], rounded up to a power of two and
    capped at 1024; UDP caps at 512, Serial forces 128; finally rounded down to a whole
    number of samples (at least one).
    """
    size = int(0.1 * rate * bytes_per_sample)
    size = max(bytes_per_sample, min(size, MAX_CHUNK_BYTES))
    size = min(_next_power_of_two(size), MAX_CHUNK_BYTES)
    if transport is Transport.UDP:
        size = min(size, UDP_MAX_CHUNK_BYTES)
    elif transport is Transport.SERIAL:
        size = SERIAL_CHUNK_BYTES
    return max(bytes_per_sample, size - size % bytes_per_sample)


def max_request_samples(measures: Measures) -> int:
    """Largest reqSamples N that fits the device's send buffer (42 for 24-byte, 128 for 8-byte)."""
    return SEND_BUFFER_PAYLOAD_BYTES // measures.bytes_per_sample


def seconds_to_overflow(rate: int, measures: Measures) -> float:
    """Time a paused meter takes to fill its ring buffer and reboot (§4.10)."""
    return RING_BUFFER_BYTES / (rate * measures.bytes_per_sample)
