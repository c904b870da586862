"""The reconciliation of a sampling session with what the meter says it sent (§4.8).

:func:`reconcile` compares what a :class:`~._session.SamplingSession` received and declared
missing with the stop reply's ``sent_samples``, and explains every difference in words.

Limits: without a stop reply (connection lost, stopped elsewhere) the meter's counts are
unknown and nothing can be reconciled; the summary says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol import Measures, Transport

if TYPE_CHECKING:
    from ..protocol import StopReply
    from ._session import SamplingSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """What a session delivered, reconciled with what the meter says it sent.

    ``received_samples`` were delivered in blocks; ``missing_declared`` were announced as
    gaps (packet gaps + corrupt frames); ``late_samples`` came in packets older than the
    next expected one: reordered (declared missing before) or duplicated (already received),
    never counted as received.  With the stop reply, ``device_sent_samples`` (samples the
    meter's socket accepted, §4.8) should equal ``received_samples + missing_declared``;
    ``unexplained`` is the difference (None without a stop reply) and ``explained`` says
    whether it is zero.
    ``notes`` explain each component in words.
    """

    meter: str
    transport: Transport
    measures: Measures
    rate: int
    ended_by: str
    """``"stop"`` (our stop reply), ``"stopped elsewhere"`` (the meter went idle without
    telling us: another client's stop), ``"stop timed out"`` (no reply to our stop),
    ``"connection lost"`` or ``"closed"``."""
    received_samples: int
    missing_declared: int
    missing_unsized_gaps: int
    late_samples: int
    gaps: int
    corrupt_frames: int
    repaired_frames: int
    skipped_bytes: int
    frames: int
    device_samples: int | None
    device_sent_samples: int | None
    start_ts: float | None
    stop_ts: float | None
    sample_duration_ms: int | None
    avg_rate: float | None
    unexplained: int | None
    explained: bool
    notes: tuple[str, ...]



def reconcile(session: SamplingSession, ended_by: str, stop: StopReply | None) -> SessionSummary:
    """The :class:`SessionSummary` of ``session``: its counts against the stop reply's (§4.8)."""
    notes: list[str] = [
        f"received {session.received_samples} samples in {session.frames} frames",
    ]
    if session.missing_declared:
        notes.append(
            f"{session.missing_declared} samples declared missing "
            f"({session.gap_count} packet gaps, {session.corrupt_frames} corrupt frames)"
        )
    if session.missing_unsized_gaps:
        notes.append(f"{session.missing_unsized_gaps} packet gaps of unknown size")
    if session.late_samples:
        notes.append(
            f"{session.late_samples} samples arrived late or twice (older than the next "
            "expected packet: declared missing before or already received; kept aside)"
        )
    if session.repaired_frames:
        notes.append(f"{session.repaired_frames} frames had a log line cut out of them (§4.6)")
    if session.skipped_bytes:
        notes.append(f"{session.skipped_bytes} bytes skipped to resynchronise")
    unexplained: int | None = None
    explained = False
    device_samples = device_sent = None
    start_ts = stop_ts = avg_rate = None
    duration = None
    if stop is not None and stop.sent_samples is not None:
        device_samples = stop.samples
        device_sent = stop.sent_samples
        start_ts = stop.start_ts
        stop_ts = stop.stop_ts
        avg_rate = stop.avg_rate
        duration = stop.sample_duration_ms
        unexplained = device_sent - session.received_samples - session.missing_declared
        explained = unexplained == 0 and not session.missing_unsized_gaps
        if unexplained == 0:
            notes.append(
                f"device sent {device_sent} = received {session.received_samples} + "
                f"declared missing {session.missing_declared}: reconciled"
            )
        elif unexplained > 0:
            notes.append(
                f"device sent {device_sent} but only {session.received_samples} received + "
                f"{session.missing_declared} declared missing: {unexplained} samples lost "
                "without a gap record (e.g. the last datagrams of a UDP stream)"
            )
        else:
            notes.append(
                f"received {-unexplained} more samples than the device reports sending "
                "(its sent_samples counts bytes the socket accepted, §4.8)"
            )
        if device_samples is not None and device_samples != device_sent:
            notes.append(
                f"device produced {device_samples} samples and sent {device_sent} "
                "(RTC filler and NTP corrections are counted differently, §4.8, §6.5)"
            )
    elif stop is not None:
        notes.append("the meter said it was not sampling when stopped: no device counts")
    else:
        notes.append(f"no stop reply ({ended_by}): the device's counts are unknown")
    summary = SessionSummary(
        meter=session.meter,
        transport=session.transport,
        measures=session.measures,
        rate=session.rate,
        ended_by=ended_by,
        received_samples=session.received_samples,
        missing_declared=session.missing_declared,
        missing_unsized_gaps=session.missing_unsized_gaps,
        late_samples=session.late_samples,
        gaps=session.gap_count,
        corrupt_frames=session.corrupt_frames,
        repaired_frames=session.repaired_frames,
        skipped_bytes=session.skipped_bytes,
        frames=session.frames,
        device_samples=device_samples,
        device_sent_samples=device_sent,
        start_ts=start_ts,
        stop_ts=stop_ts,
        sample_duration_ms=duration,
        avg_rate=avg_rate,
        unexplained=unexplained,
        explained=explained,
        notes=tuple(notes),
    )
    if stop is not None and not explained:
        logger.warning("%s: session summary does not reconcile: %s", session.meter, notes[-1])
    return summary
