"""Requests in flight: send a command, wait for its answer with a timeout, judge the reply.

:class:`Requests` keeps one future per request the connection registered
(:meth:`~smartmeter_ophyd.protocol.MeterConnection.send`); the connection's events resolve
them (:meth:`answer`, :meth:`fail`), a lost link fails them all (:meth:`lost`).  A request
whose wait times out is *abandoned* on the connection, so that its reply, if it still
comes, cannot answer the next request (there are no request ids, §2.8).  Replies are
judged with the codec's views: busy refusals become :class:`MeterBusyError`, other
refusals :class:`MeterCommandRejected` quoting the firmware's ``msg`` (passwords hidden).

Limits: the timeout is the only bound on a silent meter; the restart family waits for the
connection to drop (§3.15) and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ..protocol import (
    Answered,
    BusyReply,
    Command,
    CommandError,
    FactoryReset,
    Failed,
    Info,
    MeterConnection,
    PlainLine,
    RemoteProtocolError,
    Reply,
    ReplyView,
    Request,
    parse_reply,
)
from ._errors import (
    MeterBusyError,
    MeterCommandError,
    MeterCommandRejected,
    MeterConnectionError,
    MeterProtocolError,
    MeterTimeoutError,
)
from ._keeper import ConnectionKeeper, parse_info
from ._model import redact

logger = logging.getLogger(__name__)

_V = TypeVar("_V", bound=ReplyView)
_C = TypeVar("_C", bound=Command)


class Requests:
    """The requests of one client that wait for an answer (see the module docstring)."""

    def __init__(
        self,
        keeper: ConnectionKeeper,
        label: Callable[[], str],
        write: Callable[[bytes], None],
        timeout: float,
    ) -> None:
        self._keeper = keeper
        self._label = label
        self._write = write
        self.timeout = timeout
        self._futures: dict[Request, asyncio.Future[Answered]] = {}
        self._drops: list[asyncio.Future[None]] = []

    @property
    def awaiting_drop(self) -> bool:
        """A restart command was sent and the connection has not dropped yet."""
        return bool(self._drops)

    def connection(self) -> MeterConnection:
        connection = self._keeper.connection
        if connection is None or not self._keeper.connected:
            raise MeterConnectionError(self._label(), self._keeper.refusal or "not connected")
        return connection

    def build(self, cls: type[_C], *args: Any, **kwargs: Any) -> _C:
        """Construct a codec command; its validation error becomes a MeterCommandError."""
        try:
            return cls(*args, **kwargs)
        except CommandError as exc:
            raise MeterCommandError(self._label(), str(exc)) from exc

    async def wait(self, future: asyncio.Future[Any], what: str, timeout: float | None) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise MeterTimeoutError(self._label(), f"no reply to {what!r} within {limit} s") from None

    # ---------------------------------------------------------------- sending

    async def exchange(self, command: Command | None, timeout: float | None) -> Answered:
        """Send ``command`` (None: the ``?`` probe) and wait for its answer."""
        connection = self.connection()
        try:
            request = connection.send(command) if command is not None else connection.send_probe()
        except CommandError as exc:
            raise MeterCommandError(self._label(), str(exc)) from exc
        future: asyncio.Future[Answered] = asyncio.get_running_loop().create_future()
        self._futures[request] = future
        try:
            self._write(request.data)
            logger.debug("%s: sent %s", self._label(), request.name)  # never the arguments
            answered: Answered = await self.wait(future, request.name, timeout)
            return answered
        except MeterTimeoutError:
            connection.abandon(request)  # its late reply must not answer the next request
            raise
        except MeterConnectionError:
            connection.forget(request)
            raise
        finally:
            del self._futures[request]

    def send_silent(self, command: Command) -> None:
        """Send a command without a reply on success (``reqSamples``, §5.2; ``!``)."""
        try:
            request = self.connection().send(command)
        except CommandError as exc:
            raise MeterCommandError(self._label(), str(exc)) from exc
        self._write(request.data)

    async def reboot(self, command: Command, timeout: float | None) -> None:
        """Send a restart command and wait until the connection drops (§3.15)."""
        connection = self.connection()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drops.append(future)
        try:
            request = connection.send(command)  # expect_drop: the reconnect knows it rebooted
            if isinstance(command, FactoryReset):
                self._keeper.name_after_reboot = FactoryReset.FACTORY_NAME
            self._write(request.data)
            logger.info("%s: sent %s; the meter reboots", self._label(), command.name)
            await self.wait(future, f"{command.name} (connection drop)", timeout)
        finally:
            if future in self._drops:
                self._drops.remove(future)

    # ---------------------------------------------------------------- judging

    def view(self, command: Command, reply: Reply | PlainLine) -> ReplyView:
        if not isinstance(reply, Reply):
            raise MeterProtocolError(self._label(), f"reply to {command.name!r}: {reply!r}")
        if isinstance(command, Info):
            return parse_info(self._label(), reply)
        try:
            return parse_reply(reply, command.name)
        except RemoteProtocolError as exc:
            raise MeterProtocolError(self._label(), f"reply to {command.name!r}: {exc}") from exc

    def check(self, command: Command, reply: Reply | PlainLine) -> ReplyView:
        """The reply's view, or the typed error of a refusal."""
        view = self.view(command, reply)
        if view.succeeded:
            return view
        assert isinstance(reply, Reply)
        message = redact(view.message) if view.message is not None else None
        fields = {k: ("***" if k == "pwd" else v) for k, v in reply.fields.items()}
        kind = MeterBusyError if isinstance(view, BusyReply) else MeterCommandRejected
        raise kind(self._label(), command.name, message, fields)

    async def typed(self, command: Command, kind: type[_V], timeout: float | None = None) -> _V:
        """Send ``command`` and return its checked view of type ``kind``."""
        view = self.check(command, (await self.exchange(command, timeout)).reply)
        if not isinstance(view, kind):
            raise MeterProtocolError(
                self._label(),
                f"reply to {command.name!r} is a {type(view).__name__}, expected {kind.__name__}",
            )
        return view

    # ------------------------------------------------------ the connection's events

    def answer(self, event: Answered) -> None:
        future = self._futures.get(event.request)
        if future is not None and not future.done():
            future.set_result(event)

    def fail(self, event: Failed) -> None:
        future = self._futures.get(event.request)
        if future is not None and not future.done():
            future.set_exception(MeterProtocolError(
                self._label(), f"no usable reply to {event.request.name!r}: {event.reason}: "
                "not SmartMeter firmware?"
            ))

    def lost(self, reason: str) -> None:
        """The link dropped: every waiter fails, every restart command is done."""
        label = self._label()
        for request, future in list(self._futures.items()):
            if not future.done():
                future.set_exception(MeterConnectionError(
                    label, f"connection lost while waiting for the reply to {request.name!r} "
                    f"({reason})"
                ))
        for drop in self._drops:
            if not drop.done():
                drop.set_result(None)
