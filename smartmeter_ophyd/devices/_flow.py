"""Host-side back-pressure for ``flow_control="cts"`` flies (§5.1, §4.10).

Intent: a consumer that falls behind (slow disk, slow progress callbacks) should not grow
host memory without bound, and it must never push the meter into its ring-buffer overflow,
which reboots the meter and loses the session (§4.10).  :class:`CtsGovernor` is a small
thread that, every ``poll_s``:

* **pauses** the meter (``cts false``) when the host-side backlog - samples the client
  received that the consumer has not taken yet - reaches ``pause_backlog_s`` seconds of
  samples, but only once the meter has caught up after the previous resume (its ring
  buffer then holds at most a couple of chunks, so the client's pause-time estimate is
  honest);
* **resumes** it (``cts true``) when the backlog is down to ``resume_backlog_s`` seconds, or
  - whatever the backlog - when the client's :meth:`buffer_fill_estimate` of the paused
  meter's ring buffer reaches ``max_fill`` (at most 50 %).  Resuming flushes the meter's
  whole backlog to the host (§5.1), so the meter is always protected and the host absorbs
  the excess.

The governor runs on its own thread so a consumer stuck in one long operation cannot keep
the meter paused.  Nothing is dropped: pausing only moves where samples wait.

Limits: the fill estimate is rate x paused time minus what arrived (the client's), so it is
off by the bytes in flight when the pause took effect (a few hundred kB at most on a LAN);
``max_fill`` defaults to 25 % to leave that margin and the time of one poll.  "Caught up"
after a resume is judged from the host clock over that short window only, so crystal drift
does not accumulate.  Bursty rates (§4.3) deliver a second's samples at once; the
backlog bounds are then compared with bursts of ``rate`` samples.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ..client import MeterError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..client import SyncSamplingSession

logger = logging.getLogger(__name__)

MAX_SAFE_FILL: Final = 0.5
"""Above this estimated fill the client warns (§4.10); the governor never waits that long."""
CATCH_UP_TOLERANCE_S: Final = 0.25
"""Seconds of samples the meter may still hold after a resume and count as caught up."""


@dataclass(frozen=True, slots=True)
class CtsPolicy:
    """When the governor pauses and resumes a ``cts`` fly (seconds are of sampled data)."""

    pause_backlog_s: float = 2.0
    resume_backlog_s: float = 0.5
    max_fill: float = 0.25
    poll_s: float = 0.02

    def __post_init__(self) -> None:
        for name in ("pause_backlog_s", "resume_backlog_s", "poll_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"CtsPolicy.{name}={value!r} must be a positive number")
        if self.resume_backlog_s >= self.pause_backlog_s:
            raise ValueError(
                f"CtsPolicy: resume_backlog_s={self.resume_backlog_s} must be below "
                f"pause_backlog_s={self.pause_backlog_s}"
            )
        if not 0 < self.max_fill <= MAX_SAFE_FILL:
            raise ValueError(
                f"CtsPolicy.max_fill={self.max_fill!r} must be in (0, {MAX_SAFE_FILL}]: the meter "
                "reboots when its ring buffer overflows (§4.10)"
            )


@dataclass(frozen=True, slots=True)
class FlowStats:
    """What the governor did during one fly."""

    pauses: int
    resumes_on_backlog: int
    resumes_on_fill: int
    paused_s: float
    max_backlog_samples: int
    max_fill: float
    """Highest estimated ring-buffer fill (fraction) the governor saw while paused."""


class CtsGovernor:
    """Pauses/resumes one ``cts`` session from its own thread (see the module docstring).

    ``consumed()`` returns how many samples the consumer has taken from the session so far.
    Start with :meth:`start` after the session exists (the meter starts paused, §5.1: the
    governor resumes it at once); end with :meth:`close` before sending ``stop``.
    """

    def __init__(
        self,
        session: SyncSamplingSession,
        consumed: Callable[[], int],
        policy: CtsPolicy,
        *,
        name: str,
    ) -> None:
        self._session = session
        self._consumed = consumed
        self._policy = policy
        live = session.session
        self._rate = max(1, int(live.rate))
        self._label = live.meter
        self._pause_at = max(1, int(policy.pause_backlog_s * self._rate))
        self._resume_at = int(policy.resume_backlog_s * self._rate)
        self._tolerance = max(int(CATCH_UP_TOLERANCE_S * self._rate), 2 * live.reply.chunk_size)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name} cts", daemon=True)
        self.error: BaseException | None = None
        # state
        self._paused = True  # flowCtr sessions start paused (§5.1)
        self._paused_since = time.monotonic()
        self._caught_up = True
        self._resume_t = 0.0
        self._resume_received = 0
        self._resume_fill_samples = 0
        # statistics
        self._pauses = 0
        self._resumes_backlog = 0
        self._resumes_fill = 0
        self._paused_total = 0.0
        self._max_backlog = 0
        self._max_fill = 0.0

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        self._resume(reason="start", fill_samples=0)
        self._thread.start()

    def close(self) -> FlowStats:
        """Stop governing (the meter is left as it is: ``stop`` flushes regardless, §4.8)."""
        self._closing.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        return self.stats()

    def stats(self) -> FlowStats:
        paused = self._paused_total
        if self._paused:
            paused += time.monotonic() - self._paused_since
        return FlowStats(
            pauses=self._pauses,
            resumes_on_backlog=self._resumes_backlog,
            resumes_on_fill=self._resumes_fill,
            paused_s=paused,
            max_backlog_samples=self._max_backlog,
            max_fill=self._max_fill,
        )

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._closing.wait(self._policy.poll_s):
                if not self._session.session.active:
                    return
                self._step()
        except MeterError as exc:
            # The session is failing (connection lost, ...): the consumer reports it.
            if self._session.session.active and not self._closing.is_set():
                self.error = exc
                logger.warning("%s: flow control stopped: %s", self._label, exc)
        except Exception as exc:  # a bug here must not hang the fly
            self.error = exc
            logger.exception("%s: flow control failed", self._label)

    def _step(self) -> None:
        live = self._session.session
        received = live.received_samples
        backlog = received - self._consumed()
        self._max_backlog = max(self._max_backlog, backlog)
        if self._paused:
            fill = self._session.buffer_fill_estimate()
            self._max_fill = max(self._max_fill, fill.fraction)
            if fill.fraction >= self._policy.max_fill:
                logger.info(
                    "%s: resuming with %d samples still unconsumed: the paused meter's ring "
                    "buffer is about %.0f %% full (§4.10)",
                    self._label, backlog, 100 * fill.fraction,
                )
                self._resumes_fill += 1
                self._resume(reason="fill", fill_samples=fill.bytes // live.measures.bytes_per_sample)
            elif backlog <= self._resume_at:
                self._resumes_backlog += 1
                self._resume(reason="backlog", fill_samples=fill.bytes // live.measures.bytes_per_sample)
            return
        if not self._caught_up:
            expected = self._resume_fill_samples + self._rate * (time.monotonic() - self._resume_t)
            if received - self._resume_received >= expected - self._tolerance:
                self._caught_up = True
        if self._caught_up and backlog >= self._pause_at:
            self._pause(backlog)

    def _pause(self, backlog: int) -> None:
        logger.info("%s: pausing the meter (cts false): %d samples not consumed yet",
                    self._label, backlog)
        self._session.cts(False)
        self._paused = True
        self._paused_since = time.monotonic()
        self._pauses += 1

    def _resume(self, *, reason: str, fill_samples: int) -> None:
        # taken before the request: the meter's flush may arrive before the cts reply
        received = self._session.session.received_samples
        now = time.monotonic()
        self._session.cts(True)
        if reason != "start":
            self._paused_total += now - self._paused_since
            logger.info("%s: resuming the meter (cts true, %s)", self._label, reason)
        self._paused = False
        self._caught_up = False
        self._resume_t = now
        self._resume_received = received
        self._resume_fill_samples = fill_samples
