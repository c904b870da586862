"""The emulated meter's session state as plain data: what the command handlers and the meter
loop share (§4.1, §4.7, §5, §6.4), with no behaviour of its own.

It lives apart from :mod:`._meter` so that the command handlers (:mod:`._commands`) and the
control channel (:mod:`._control`) can name these types without importing the meter, and the
meter can import them without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smartmeter_ophyd.protocol import Measures, Transport

from ._endpoints import Endpoint
from ._sampling import SamplingEngine
from ._sinks import Sink


@dataclass
class SampleSettings:
    """The firmware's stored stream configuration (``standardConfig``, §4.1 step 3)."""

    transport: Transport = Transport.TCP
    prefix: bool = True
    flow_control: bool = False
    rate: int = 8000
    measures: Measures = Measures.VI
    rts: bool = True
    slot: tuple[int, int] | None = None


@dataclass
class Session:
    """A running sampling session."""

    settings: SampleSettings
    engine: SamplingEngine
    sink: Sink
    requester: Endpoint | None
    chunk: int
    waveform: bool = True
    """False for the latched path (reqSamples is refused there, §5.2)."""
    raw_stream: bool = False
    packet: int = 0
    sent_payload_bytes: int = 0
    start_ts_text: str = "0.000"
    rate_log_marks: int = 0
    """Rate marks of the engine already logged (§4.7)."""
    seconds_seen: int = 0
    """RTC seconds of the engine already checked for ``MISSED`` (§4.7)."""
    slot_sink: Sink | None = None
    slot_active: bool = False
    slot_sent_bytes: int = 0

    @property
    def bps(self) -> int:
        return self.settings.measures.bytes_per_sample

    @property
    def channels(self) -> int:
        return self.settings.measures.values_per_sample


@dataclass
class PendingStart:
    """A scheduled start waiting in the idle loop (§6.4)."""

    at_s: int
    settings: SampleSettings
    sink: Sink
    requester: Endpoint | None
    due_true: float | None = None
    """True instant the ``millis()`` countdown ends (see ``EmulatedMeter.countdown_true``);
    None: when the meter clock reads ``at_s`` - 1 ms."""


@dataclass
class Faults:
    """Test-only fault injection (control channel)."""

    stall_s: float = 0.0
    garbage: bytes = b""
    log_in_frame: str | None = None
    logs_into_frames: int = 0
    """The meter's next N log lines to the sampling connection land inside data frames."""
    held_logs: list[bytes] = field(default_factory=list)
    drop_datagrams: int = 0
    duplicate_datagrams: int = 0
    """The next N UDP datagrams are delivered twice (a network fault, not the firmware's)."""
    reorder_datagrams: int = 0
    """The next N UDP datagrams each arrive after the one that follows them (network fault)."""
