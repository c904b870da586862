"""``meter.ntp``: one NTP sync of a meter, as a triggerable ophyd device (§3.7, §6.2, §6.5).

Intent: plans gate on the meter's own account of its clock.  ``trigger()`` sends ``ntp`` and
completes when the meter has logged ``NTP synced with conf: N`` and replied; the signals then
hold what the meter said about that sync::

    yield from bps.trigger_and_read([meter.ntp])      # an event with the sync's values
    yield from bps.trigger(meter.ntp, wait=True)      # just sync; fails if the sync failed

* ``confidence_ms`` (hinted): half the NTP round trip in ms, as logged (§6.2).
* ``offset_s``: while the meter samples, ``Offset of <s> s`` of its §6.5 record (the
  NTP-corrected sampling duration minus samples / rate); NaN while idle, where the firmware
  logs no offset.
* ``synced_at``: the meter's clock at the sync, unix seconds, 1 ms resolution.  While
  sampling this is the record's ``To`` timestamp (taken right after the sync, §6.5).  While
  idle the firmware logs only the confidence, so it is the reply's ``current_time`` (long
  local time, taken when the reply is built right after the sync, §3.7), converted with the
  firmware's UTC+1 and EU DST rule (§6.1); in the repeated hour when DST ends that local
  time is ambiguous and the later instant is taken.  Never the host's receive time.
* ``succeeded``: whether the last sync succeeded.  After a failure the other signals are NaN.

Blocking or background (§3.7, §6.2): a blocking sync runs on the meter's main core and writes
its RTC, which restarts the RTC seconds the sampling counts (the time model then sees a
second cut short or stretched); a background sync (``bg: true``) does not.  ``background``
None (the default) sends a background sync while the meter samples and a blocking one
otherwise; True/False force one.  A background sync's reply only says it started: the
status then waits for the confidence line, and fails if none comes (the firmware logs
nothing when a background sync fails).

The whole operation is one coroutine on the client's shared event loop (no thread per
trigger): it subscribes to the log *before* sending ``ntp`` (the firmware logs the record
before replying, §3.7), awaits the reply, and feeds every line to a
:class:`~smartmeter_ophyd.client.SyncRecordAssembler`.  The record of this sync is the last
one whose lines preceded the reply: the firmware handles one command at a time.

Failures (the status fails with :class:`NtpSyncError`, naming the meter and what was seen):
the meter replies ``Error syncing time`` (firmware 2.2 logs no failure line, §3.7), no reply
within the timeout, the connection drops, the reply claims success without a confidence line,
or this connection's log level is above INFO, which hides the confidence line (§2.4) -- the
last one is refused before anything is sent.  The timeout defaults to the meter's
``timeout``; the firmware itself gives up after 200 ms plus DNS (§3.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, Final, Protocol

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus, Status
from ophyd.utils.errors import ReadOnlyError

from ..client import (
    AsyncMeterClient,
    MeterClient,
    MeterCommandRejected,
    MeterError,
    SyncRecord,
    SyncRecordAssembler,
)
from ..protocol import LogLevel, LogLine, NtpReply, parse_long_time
from ._status import status_from_coroutine

logger = logging.getLogger(__name__)

BACKGROUND_SYNC_S: Final = 0.5
"""A background sync's own duration: at most 200 ms for the answer plus DNS (§6.2)."""
LATE_RECORD_S: Final = 1.5
"""While sampling, how long after the ``ntp`` reply the sync record's lines may still come."""

SEEN_LINES_IN_ERRORS: Final = 6
"""How many of the lines seen during a failed sync its error quotes (the last ones)."""


class NtpSyncError(MeterError):
    """A meter's NTP sync failed or could not be confirmed from its log."""


class _MeterLike(Protocol):
    """What :class:`MeterNtp` needs from its parent (a :class:`SmartMeter`)."""

    @property
    def meter_label(self) -> str: ...

    @property
    def client(self) -> MeterClient: ...

    timeout: float


class NtpReadback(Signal):
    """A value read from the meter's log or reply; users cannot write it."""

    def __init__(self, *args: Any, units: str = "", dtype: str = "number", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._units = units
        self._dtype = dtype

    def put(self, value: Any, **kwargs: Any) -> None:
        raise ReadOnlyError(f"{self.name} is read from the meter and cannot be written")

    def set(self, value: Any, **kwargs: Any) -> Status:
        raise ReadOnlyError(f"{self.name} is read from the meter and cannot be written")

    def _update(self, value: Any, timestamp: float) -> None:
        super().put(value, timestamp=timestamp)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc: dict[str, dict[str, Any]] = super().describe()
        entry = desc[self.name]
        entry["dtype"] = self._dtype
        entry["shape"] = []
        if self._dtype == "number":
            entry["dtype_numpy"] = "<f8"
        if self._units:
            entry["units"] = self._units
        return desc


class MeterNtp(Device):
    """The NTP sync of its parent :class:`~smartmeter_ophyd.devices.SmartMeter` (``meter.ntp``).

    See the module docstring for the signals and when ``trigger()`` completes or fails.
    ``timeout`` (None: the meter's own) bounds the wait for the meter's reply.
    """

    confidence_ms = Cpt(NtpReadback, value=math.nan, units="ms", kind=Kind.hinted)
    offset_s = Cpt(NtpReadback, value=math.nan, units="s", kind=Kind.normal)
    synced_at = Cpt(NtpReadback, value=math.nan, units="s", kind=Kind.normal)
    succeeded = Cpt(NtpReadback, value=False, dtype="boolean", kind=Kind.normal)

    def __init__(
        self, *args: Any, timeout: float | None = None, background: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self.background = background
        """None: background while the meter samples, else blocking (see the module docs)."""
        self.last_record: SyncRecord | None = None
        """The meter's sync record behind the signals (None before the first success)."""
        self._running: DeviceStatus | None = None

    @property
    def meter(self) -> _MeterLike:
        parent = self.parent
        if parent is None:
            raise RuntimeError(f"{self.name}: MeterNtp must be a component of a SmartMeter")
        return parent  # type: ignore[no-any-return]

    def stage(self) -> list[Any]:
        connect = getattr(self.meter, "connect", None)
        if callable(connect):
            connect()  # idempotent; lets plans stage meter.ntp on its own
        return super().stage()  # type: ignore[no-any-return]

    def trigger(self) -> DeviceStatus:
        """Send ``ntp``; the status completes when the meter confirmed the sync (see above)."""
        meter = self.meter
        label = meter.meter_label
        status = DeviceStatus(self, call_stop_on_failure=False)
        if self._running is not None and not self._running.done:
            status.set_exception(NtpSyncError(label, "an NTP sync of this meter is already running"))
            return status
        try:
            client = meter.client
        except MeterError as exc:
            self._record_failure(time.time())
            status.set_exception(NtpSyncError(label, f"NTP sync not sent: {exc.detail}"))
            return status
        timeout = self.timeout if self.timeout is not None else meter.timeout
        status = status_from_coroutine(
            self, client, self._sync(client.async_client, timeout, self.background),
            status=status,
        )
        self._running = status
        return status

    async def _sync(
        self, client: AsyncMeterClient, timeout: float, background: bool | None
    ) -> SyncRecord:
        label = client.meter_label
        sampling = client.session is not None
        bg = sampling if background is None else background
        if client.log_level > LogLevel.INFO:
            self._record_failure(time.time())
            raise NtpSyncError(
                label,
                "NTP sync not sent: this connection's log level is "
                f"{client.log_level.name}, which hides the INFO line 'NTP synced with conf' "
                "(§2.4); set the meter's log_level to INFO",
            )
        assembler = SyncRecordAssembler()
        records: list[SyncRecord] = []
        seen: list[LogLine] = []
        completed = asyncio.Event()

        def take(line: LogLine) -> None:
            if line.text:
                seen.append(line)
            record = assembler.feed(line)
            if record is not None:
                records.append(record)
                completed.set()

        unsubscribe = client.subscribe_logs(take)  # before sending: the log precedes the reply
        try:
            reply = await client.ntp_sync(bg, timeout=timeout)
            if (sampling or bg) and not records:
                # A background sync replies before it ran (§3.7); while sampling the record's
                # lines can also sit inside data frames (§4.6) that the decoder only releases
                # with the next bytes: give them a moment.
                wait = LATE_RECORD_S + (BACKGROUND_SYNC_S if bg else 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(completed.wait(), wait)
        except MeterCommandRejected as exc:
            self._record_failure(time.time())
            server = client.info.time_server if client.info is not None else None
            raise NtpSyncError(
                label,
                f"NTP sync failed: the meter replied {exc.firmware_msg!r} (its time server "
                f"{server!r} gave no usable answer within 200 ms, §6.2); "
                f"{_seen(seen)}",
            ) from exc
        except MeterError as exc:
            self._record_failure(time.time())
            raise NtpSyncError(label, f"NTP sync failed: {exc.detail}; {_seen(seen)}") from exc
        finally:
            unsubscribe()
        last = assembler.flush()
        if last is not None:
            records.append(last)
        record = records[-1] if records else None
        if record is None or record.confidence_ms is None:
            self._record_failure(time.time())
            raise NtpSyncError(
                label,
                f"the meter replied {reply.message!r} but logged no 'NTP synced with conf' "
                f"line at log level {client.log_level.name}; {_seen(seen)}",
            )
        if record.problems:
            logger.warning("%s: NTP sync record incomplete: %s", label, "; ".join(record.problems))
        self._record_success(record, reply, label)
        timing = getattr(self.parent, "timing_stream", None)
        if bg and timing is not None:
            timing.mark_background(record)
        return record

    def _record_success(self, record: SyncRecord, reply: NtpReply, label: str) -> None:
        now = time.time()
        assert record.confidence_ms is not None
        self.last_record = record
        self.confidence_ms._update(float(record.confidence_ms), now)
        self.offset_s._update(record.offset_s if record.offset_s is not None else math.nan, now)
        self.synced_at._update(_synced_at(record, reply, label), now)
        self.succeeded._update(True, now)

    def _record_failure(self, now: float) -> None:
        for signal in (self.confidence_ms, self.offset_s, self.synced_at):
            signal._update(math.nan, now)
        self.succeeded._update(False, now)


def _synced_at(record: SyncRecord, reply: NtpReply, label: str) -> float:
    """The meter's clock at the sync: ``To`` while sampling, else the reply's current time."""
    if record.to_ts is not None:
        return record.to_ts
    if reply.current_time:
        try:
            return parse_long_time(reply.current_time, dst_known=True)
        except ValueError:
            pass
    logger.warning(
        "%s: NTP sync without a time of the meter's own: reply current_time %r",
        label, reply.current_time,
    )
    return math.nan


def _seen(lines: list[LogLine]) -> str:
    if not lines:
        return "no log line arrived meanwhile"
    shown = lines[-SEEN_LINES_IN_ERRORS:]
    quoted = "; ".join(f"[{line.level.tag}] {line.text}" for line in shown)
    more = f" (last {len(shown)} of {len(lines)})" if len(lines) > len(shown) else ""
    return f"log lines seen{more}: {quoted}"
