"""The command connection's protocol state, sans-I/O: which reply answers which request,
and whether a sampling session runs (h11's ``Connection`` for the SmartMeter).

:class:`MeterConnection` owns a :class:`~._decoder.StreamDecoder`.  The I/O layer hands it
the commands it is about to write (:meth:`MeterConnection.send` returns the bytes and a
:class:`Request` handle) and the bytes it read (:meth:`~MeterConnection.receive_data`);
:meth:`~MeterConnection.events` returns the decoder's events with the connection's own
events in stream order: :class:`Answered`, :class:`InfoLine`, :class:`LateReply`,
:class:`StrayReply`, :class:`Failed`, :class:`SessionStarted`, :class:`SessionEnded`.

Matching rules (the firmware has no request ids; §2.8):

* Replies come in request order on a connection, so requests whose reply echoes ``cmd``
  wait in one queue per command name, oldest first.
* Commands whose echo the firmware corrupts (``calibration``, ``dailyRestart``, ``ade9k``,
  ``getLog``; §2.9) share one queue; its head takes the next reply that names its command,
  or names no command at all.  ``getLog`` first takes its dump line (often not JSON,
  §3.14), then its final reply.
* ``info`` is answered by the next info line (every waiting ``info`` at once); ``?`` by
  ``Info:Setup done`` (§2.2).  ``reqSamples`` is silent on success (§5.2), so it waits for
  nothing; its error reply is a :class:`StrayReply`.  The restart family answers by
  dropping the connection (§3.15): :attr:`MeterConnection.expect_drop`.
* A request the caller gave up on (:meth:`~MeterConnection.abandon`) keeps its place: its
  reply, if it still comes, is a :class:`LateReply` and cannot answer the next request.
* A reply line refused before parsing (:class:`~._events.RefusedLine`: JSON nested too
  deep) fails and forgets every waiting request (:class:`Failed`): the peer is not a
  SmartMeter, and any of them may have been answered by that line.
* Log lines of other clients interleave freely (§2.4); busy replies and inverted error
  flags are judged later by :func:`~._replies.parse_reply`, not here.

Session rules: a successful reply to our ``sample`` starts a session (:class:`SessionStarted`,
§4.4); a ``stop`` reply ends it (:class:`SessionEnded`, §4.8).  A lifeness line (§2.6 -- only
sent while idle) after the session's data began, with no ``stop`` of ours under way, means
another client stopped it (§4.8): the session ends ``"stopped elsewhere"``.  During a
scheduled start's countdown the meter is idle and lifeness continues (§6.4), hence "after
the data began".  Data over UDP never passes through here: report it with
:meth:`MeterConnection.stream_data_seen`.

Limits: the connection does not know time; timeouts are the caller's (it calls
:meth:`~MeterConnection.abandon`).  One session at a time per connection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from ._commands import COMMANDS, PROBE, Command, GetLog, Info, Sample, Stop
from ._decoder import StreamDecoder, StreamSession
from ._events import (
    CorruptFrame,
    Event,
    LogLine,
    PacketGap,
    PlainLine,
    RefusedLine,
    Reply,
    Samples,
    UnparsedReply,
)
from ._replies import is_log_dump

__all__ = [
    "OVERFLOW_LOG_TEXT",
    "Answered",
    "Failed",
    "InfoLine",
    "LateReply",
    "MeterConnection",
    "Request",
    "SessionEnded",
    "SessionStarted",
    "StrayReply",
]

OVERFLOW_LOG_TEXT: Final = "Overflow during ringBuffer write"
"""The ERROR log a meter sends (maybe) just before its overflow reboot (§4.10)."""
PROBE_NAME: Final = "?"
_COMMAND_NAMES: Final = frozenset(COMMANDS)
_DATA_EVENTS: Final = (Samples, PacketGap, CorruptFrame)


class Request:
    """One request on the connection, from :meth:`MeterConnection.send` until answered.

    ``data`` is the line to write.  ``dump`` holds ``getLog``'s dump line once it came.
    """

    __slots__ = ("abandoned", "command", "data", "dump", "name")

    def __init__(self, command: Command | None, data: bytes) -> None:
        self.command = command
        self.name = command.name if command is not None else PROBE_NAME
        self.data = data
        self.abandoned = False
        self.dump: Reply | UnparsedReply | None = None

    def __repr__(self) -> str:
        state = " abandoned" if self.abandoned else ""
        return f"<Request {self.name}{state}>"


@dataclass(frozen=True, slots=True, eq=False)
class Answered(Event):
    """``reply`` answers ``request`` (a :class:`PlainLine` for the ``?`` probe)."""

    request: Request
    reply: Reply | PlainLine


@dataclass(frozen=True, slots=True)
class InfoLine(Event):
    """The info message (§2.5): on connect, and as the answer to ``info``."""

    reply: Reply


@dataclass(frozen=True, slots=True, eq=False)
class LateReply(Event):
    """The reply to a request its caller abandoned (timed out); it answers nothing now."""

    request: Request
    reply: Reply | UnparsedReply


@dataclass(frozen=True, slots=True)
class StrayReply(Event):
    """A reply line no request waits for; ``reason`` says why it matched nothing."""

    reply: Reply | UnparsedReply
    reason: str


@dataclass(frozen=True, slots=True, eq=False)
class Failed(Event):
    """``request`` cannot be answered: ``reason`` (the peer broke the protocol)."""

    request: Request
    reason: str


@dataclass(frozen=True, slots=True, eq=False)
class SessionStarted(Event):
    """Our ``sample`` succeeded (§4.4): frames in ``stream``'s format follow."""

    request: Request
    reply: Reply
    stream: StreamSession


@dataclass(frozen=True, slots=True)
class SessionEnded(Event):
    """The session is over: ``reason`` is ``"stop"`` (a stop reply with the meter's counts,
    §4.8) or ``"stopped elsewhere"`` (the meter went idle without a stop of ours)."""

    reason: str
    reply: Reply | None


class _Session:
    __slots__ = ("data_seen", "request", "stopping")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.data_seen = False
        self.stopping = False


def _stream_of(reply: Reply) -> StreamSession | None:
    """The frame format a successful sample reply announces (§4.4), or None."""
    fields = reply.fields
    if reply.error is not False:
        return None
    measurements = fields.get("measurements")
    if not isinstance(measurements, int) or isinstance(measurements, bool) or measurements <= 0:
        return None
    chunk = fields.get("chunksize")
    prefix = fields.get("prefix", True)
    return StreamSession(
        measurements,
        chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else None,
        prefix if isinstance(prefix, bool) else True,
    )


class MeterConnection:
    """Sans-I/O state of one command connection (TCP 54321, a dialled-in meter, serial).

    ``decoder`` is exposed for its counters and :meth:`~._decoder.StreamDecoder.
    release_pending`; feed bytes through :meth:`receive_data`, not to it directly.
    """

    def __init__(self, *, serial: bool = False) -> None:
        self.decoder = StreamDecoder(serial=serial)
        self._queues: dict[str, deque[Request]] = {}
        self._loose: deque[Request] = deque()
        self._info: list[Request] = []
        self._probes: list[Request] = []
        self._session: _Session | None = None
        self.expect_drop = False
        """A command that reboots the meter was sent (§3.15): a drop is expected."""
        self.overflow_announced = False
        """The meter logged a ring-buffer overflow: it reboots now (§4.10)."""

    # ------------------------------------------------------------------ requests

    def send(self, command: Command) -> Request:
        """Register ``command`` as about to be written; ``request.data`` is its line.

        Raises :class:`~._errors.CommandError` if it cannot be encoded (nothing is
        registered then).  Commands without a reply (``reqSamples``, the restart family)
        return a request that waits for nothing.
        """
        request = Request(command, command.encode())
        if isinstance(command, Info):
            self._info.append(request)
        elif command.reboots:
            self.expect_drop = True
        elif not command.expects_reply:
            pass
        elif command.reply_cmd_reliable:
            self._queues.setdefault(command.name, deque()).append(request)
        else:
            self._loose.append(request)
        if isinstance(command, Stop) and self._session is not None:
            self._session.stopping = True
        return request

    def send_probe(self) -> Request:
        """Register a ``?`` probe (§2.2)."""
        request = Request(None, PROBE)
        self._probes.append(request)
        return request

    def abandon(self, request: Request) -> None:
        """The caller gave up on ``request``: its reply, should it come, is a :class:`LateReply`.

        ``info`` and ``?`` have no late form (any later info line or ``Setup done``
        answers whoever waits then), so they are simply forgotten.
        """
        request.abandoned = True
        for waiting in (self._info, self._probes):
            if request in waiting:
                waiting.remove(request)

    def forget(self, request: Request) -> None:
        """``request`` was never written (the write failed): drop it without a trace."""
        for queue in (*self._queues.values(), self._loose, self._info, self._probes):
            if request in queue:
                queue.remove(request)
                return

    def waiting(self) -> list[Request]:
        """Every request still waiting for its answer, oldest first per kind."""
        pending = [r for q in self._queues.values() for r in q] + list(self._loose)
        return [r for r in (*pending, *self._info, *self._probes) if not r.abandoned]

    @property
    def awaiting_reply(self) -> bool:
        """True while any request waits for a reply (abandoned ones do not count)."""
        return bool(self.waiting())

    def close_requests(self) -> list[Request]:
        """Forget every request (abandoned ones too); return those still waiting."""
        waiting = self.waiting()
        self._queues.clear()
        self._loose.clear()
        self._info.clear()
        self._probes.clear()
        return waiting

    def close(self) -> list[Request]:
        """The connection is gone: every waiting request is returned and forgotten."""
        self._session = None
        return self.close_requests()

    # ------------------------------------------------------------------- session

    @property
    def session_active(self) -> bool:
        return self._session is not None

    @property
    def stopping(self) -> bool:
        """A ``stop`` was sent during the running session."""
        return self._session is not None and self._session.stopping

    def stream_data_seen(self) -> None:
        """Session data arrived by another way (UDP datagrams, §4.13)."""
        if self._session is not None:
            self._session.data_seen = True

    def end_session(self) -> None:
        """Forget the session (its data goes elsewhere, e.g. a closed UDP session)."""
        self._session = None
        self.decoder.end_session()

    # ----------------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed what the peer sent; ``b""`` when it closed."""
        self.decoder.receive_data(data)

    def events(self) -> list[Event]:
        """Every event available now, decoder and connection events in stream order."""
        return self._route(self.decoder.events())

    def release_pending(self) -> list[Event]:
        """The decoder's held last frame, unverified (see its ``release_pending``)."""
        return self._route(self.decoder.release_pending())

    def _route(self, events: list[Event]) -> list[Event]:
        session = self._session
        out: list[Event] | None = None
        for index, event in enumerate(events):
            kind = type(event)
            if kind is Samples or isinstance(event, _DATA_EVENTS):
                if session is not None:
                    session.data_seen = True
                if out is not None:
                    out.append(event)
                continue
            if out is None:
                out = events[:index]
            self._on_line(event, out)
            session = self._session
        return events if out is None else out

    def _on_line(self, event: Event, out: list[Event]) -> None:
        kind = type(event)
        if kind is Reply:
            assert isinstance(event, Reply)
            self._on_reply(event, out)
            return
        if kind is LogLine:
            assert isinstance(event, LogLine)
            session = self._session
            if not event.text and session is not None and session.data_seen and not session.stopping:
                self.end_session()
                out.append(SessionEnded("stopped elsewhere", None))
            elif event.text.startswith(OVERFLOW_LOG_TEXT):
                self.overflow_announced = True
        elif kind is PlainLine:
            assert isinstance(event, PlainLine)
            if event.text.strip() == "Setup done" and self._probes:
                probes, self._probes = self._probes, []
                out.append(event)
                out.extend(Answered(probe, event) for probe in probes)
                return
        elif kind is UnparsedReply:
            assert isinstance(event, UnparsedReply)
            head = self._loose[0] if self._loose else None
            if head is not None and head.name == GetLog.name and head.dump is None:
                head.dump = event
            else:
                out.append(StrayReply(event, "not JSON"))
            return
        elif kind is RefusedLine:
            assert isinstance(event, RefusedLine)
            # Firmware never sends such a line: the peer is not a meter, and the line may
            # have answered any of the waiting requests.  Fail them all and forget them, so
            # the next request is not queued behind a reply that will never come.
            out.append(event)
            for request in self.close_requests():
                out.append(Failed(request, f"a reply line was refused: {event.reason}"))
            return
        out.append(event)

    def _on_reply(self, reply: Reply, out: list[Event]) -> None:
        cmd = reply.cmd
        if cmd == Info.name and "type" in reply.fields:
            out.append(InfoLine(reply))
            waiting, self._info = self._info, []
            out.extend(Answered(request, reply) for request in waiting)
            return
        head = self._loose[0] if self._loose else None
        dump_due = head is not None and head.name == GetLog.name and head.dump is None
        if dump_due and is_log_dump(reply):
            assert head is not None
            head.dump = reply
            return
        queue = self._queues.get(cmd) if cmd is not None else None
        if queue:
            self._answer(queue.popleft(), reply, out)
        elif head is not None and (
            cmd == head.name or (not dump_due and cmd not in _COMMAND_NAMES)
        ):
            self._answer(self._loose.popleft(), reply, out)
        elif dump_due and cmd not in _COMMAND_NAMES:
            out.append(StrayReply(reply, "getLog's final reply came before its log dump"))
        elif cmd == "reqSamples":
            out.append(StrayReply(reply, "reqSamples refused by the firmware (§5.2)"))
        elif cmd == Stop.name and "samples" in reply.fields and self._session is not None:
            # a stop written around send() still stops the meter (the decoder saw it too)
            self._end_by_stop(reply, out)
            out.append(StrayReply(reply, "stop reply nobody waits for"))
        else:
            out.append(StrayReply(reply, "nobody waits for it"))

    def _answer(self, request: Request, reply: Reply, out: list[Event]) -> None:
        out.append(LateReply(request, reply) if request.abandoned else Answered(request, reply))
        if isinstance(request.command, Sample) and not request.abandoned:
            stream = _stream_of(reply)
            if stream is not None:
                self._session = _Session(request)
                out.append(SessionStarted(request, reply, stream))
        elif isinstance(request.command, Stop) and self._session is not None:
            self._end_by_stop(reply, out)

    def _end_by_stop(self, reply: Reply, out: list[Event]) -> None:
        # A stop reply with counts ends our session (§4.8); the idle form means the meter
        # was no longer sampling: stopped elsewhere before any data or lifeness told us.
        reason = "stop" if "samples" in reply.fields else "stopped elsewhere"
        self.end_session()
        out.append(SessionEnded(reason, reply))

