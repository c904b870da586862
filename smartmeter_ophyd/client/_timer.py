"""One timer per event loop for the periodic duties of every client on it.

Keep-alives, liveness checks, read-batching deadlines: each client is due for something every
so often, and a fleet of meters on one loop would otherwise keep one timer (or one sleeping
task) per meter and per duty.  :class:`LoopTimer` keeps a single ``TimerHandle``, armed for
the earliest time any registered :class:`Duty` is due; when it fires, every duty whose time
has come runs, and each says when it is next due.

Limits: precision is the loop's (a few ms) and never finer than :data:`MIN_TICK_S`; a duty
must be quick (it runs in the loop, synchronously).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from typing import Final, Protocol

logger = logging.getLogger(__name__)

MIN_TICK_S: Final = 0.02
"""The shared timer never fires more often than this."""


class Duty(Protocol):
    """Something a client must do from time to time."""

    def tick(self, now: float) -> float:
        """Do what is due at ``now`` (``time.monotonic()``); return when next due (inf: not
        until woken again with :meth:`LoopTimer.wake_by`)."""

    def label(self) -> str:
        """How logs name the meter this duty serves."""


class LoopTimer:
    """The one timer of an event loop, shared by every :class:`Duty` registered on it."""

    _timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopTimer] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._duties: dict[Duty, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._due = math.inf
        self.ticks = 0
        """How often the timer fired (for diagnostics and the benchmarks)."""

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopTimer:
        timer = cls._timers.get(loop)
        if timer is None:
            timer = cls._timers[loop] = cls(loop)
        return timer

    def add(self, duty: Duty, due: float) -> None:
        """Register ``duty`` (again), first due at ``due`` (monotonic seconds)."""
        self._duties[duty] = due
        self._arm(due)

    def remove(self, duty: Duty) -> None:
        self._duties.pop(duty, None)
        if not self._duties and self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._due = math.inf

    def wake_by(self, duty: Duty, due: float) -> None:
        """``duty`` wants to run no later than ``due``."""
        if duty in self._duties and due < self._duties[duty]:
            self._duties[duty] = due
            self._arm(due)

    def _arm(self, due: float) -> None:
        if due >= self._due or self._loop.is_closed():
            return
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        delay = max(MIN_TICK_S, due - time.monotonic())
        self._handle = self._loop.call_at(self._loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._due = math.inf
        self.ticks += 1
        now = time.monotonic()
        for duty, due in list(self._duties.items()):
            if due > now or duty not in self._duties:
                continue
            try:
                due = duty.tick(now)
            except Exception:  # one broken client must not stop the others' duties
                logger.exception("%s: periodic duty failed", duty.label())
                due = now + 1.0
            if duty in self._duties:  # a duty may end its own registration while it runs
                self._duties[duty] = due
        if self._duties:
            self._arm(min(self._duties.values()))
