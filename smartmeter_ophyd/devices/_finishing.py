"""The order in which meters that end together finish their files on the one I/O thread.

Intent: every meter of a process writes and closes its file on the client loop's one I/O
thread, in the order the work is handed over.  When many meters end together (a
multi-meter fly's targets arrive within tens of milliseconds), each file's finish (the
last rows, the time model, the ``/time`` rewrite, the close: ~10 ms for 10 s at 8 kHz)
queues behind the others in the order the meters' stop replies came.  One file can matter
more than the rest: the alignment's reference, which every other meter's alignment waits
for.  :class:`FinishTurns` lets such a meter go ahead of the meters still waiting.

It keeps at most ``depth`` finishes handed to the I/O thread at once (one running and one
queued behind it by default, so the thread does not wait for the loop between two of
them); the others wait here, those marked ``first`` ahead of the rest, each group in the
order it came.  A meter marked ``first`` therefore waits for at most ``depth`` finishes.
Data writes of meters still sampling are not held back.

Limits: one instance per event loop (:func:`finish_turns`), used from that loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import weakref
from collections.abc import AsyncIterator
from typing import Final

__all__ = ["FinishTurns", "finish_turns"]

DEPTH: Final = 2
"""Finishes handed to the I/O thread at once: one running, one queued behind it."""


class FinishTurns:
    """Turns to finish a file on the I/O thread: at most ``depth`` at once, ``first`` ahead."""

    def __init__(self, depth: int = DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.depth = depth
        self._active = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @property
    def active(self) -> int:
        """Finishes holding a turn now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Finishes waiting for a turn now."""
        return sum(1 for *_, turn in self._waiting if not turn.done())

    @contextlib.asynccontextmanager
    async def turn(self, first: bool = False) -> AsyncIterator[None]:
        """Hold a turn for the body (a file's finish); ``first`` goes ahead of the others
        waiting.  A cancelled wait gives up its place (and its turn, if it was granted)."""
        if self._active < self.depth and not self._waiting:
            self._active += 1
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (0 if first else 1, next(self._arrival), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release()  # granted as the wait was cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._active -= 1
        while self._waiting and self._active < self.depth:
            *_, granted = heapq.heappop(self._waiting)
            if not granted.done():  # a cancelled wait is skipped
                self._active += 1
                granted.set_result(None)


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FinishTurns] = (
    weakref.WeakKeyDictionary()
)


def finish_turns(loop: asyncio.AbstractEventLoop) -> FinishTurns:
    """The turns of ``loop``'s I/O thread (one per loop, made on first use)."""
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = FinishTurns()
    return turns
