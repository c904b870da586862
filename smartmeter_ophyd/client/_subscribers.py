"""Who hears what the meter says besides the replies: log lines and connection events.

:class:`Subscribers` calls each log callback with every :class:`~smartmeter_ophyd.protocol.
LogLine` (§2.4: other clients' errors and lifeness lines included) and each event callback
with :class:`~._model.ConnectionLost` / :class:`~._model.Reconnected`.  A failing callback is
logged and never stops the receive path.

Limits: callbacks run in the event loop, synchronously: they must be short.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..protocol import LogLine
from ._model import ClientEvent, ConnectionLost

logger = logging.getLogger(__name__)


class Subscribers:
    """Log-line and connection-event callbacks of one client."""

    def __init__(self, label: Callable[[], str]) -> None:
        self._label = label
        self._logs: list[Callable[[LogLine], None]] = []
        self._events: list[Callable[[ClientEvent], None]] = []

    def add_log(self, callback: Callable[[LogLine], None]) -> Callable[[], None]:
        """Subscribe ``callback`` to log lines; returns the unsubscribe function."""
        self._logs.append(callback)
        return functools.partial(_discard, self._logs, callback)

    def add_event(self, callback: Callable[[ClientEvent], None]) -> Callable[[], None]:
        """Subscribe ``callback`` to connection events; returns the unsubscribe function."""
        self._events.append(callback)
        return functools.partial(_discard, self._events, callback)

    def log(self, line: LogLine) -> None:
        for callback in list(self._logs):
            try:
                callback(line)
            except Exception:
                logger.exception("%s: log subscriber failed", self._label())

    def publish(self, event: ClientEvent) -> None:
        for callback in list(self._events):
            try:
                callback(event)
            except Exception:
                logger.exception("%s: event subscriber failed", self._label())

    async def lines(self, closing: Callable[[], bool]) -> AsyncIterator[LogLine]:
        """Log lines from now on; ends when the connection is lost while ``closing()``."""
        queue: asyncio.Queue[LogLine | None] = asyncio.Queue()
        unsubscribe = self.add_log(queue.put_nowait)
        closer = self.add_event(
            lambda event: queue.put_nowait(None)
            if isinstance(event, ConnectionLost) and closing()
            else None
        )
        try:
            while (line := await queue.get()) is not None:
                yield line
        finally:
            unsubscribe()
            closer()


def _discard(subscribers: list[Any], callback: Any) -> None:
    with contextlib.suppress(ValueError):
        subscribers.remove(callback)
