"""Host-side back-pressure for ``flow_control="cts"`` flies (§5.1, §4.10).

Intent: a consumer that falls behind (slow disk, slow callbacks) should not grow host memory
without bound, and it must never push the meter into its ring-buffer overflow, which reboots
the meter and loses the session (§4.10).  :class:`CtsGovernor` decides, each time the fly
controller asks (every ``poll_s``):

* **pause** (``cts false``) when the host-side backlog - samples the client received that
  the writer has not taken yet - reaches ``pause_backlog_s`` seconds of samples, but only
  once the meter has caught up after the previous resume (its ring buffer then holds at
  most a couple of chunks, so the pause-time fill estimate is honest);
* **resume** (``cts true``) when the backlog is down to ``resume_backlog_s`` seconds, or -
  whatever the backlog - when the estimated fill of the paused meter's ring buffer reaches
  ``max_fill`` (at most 50 %).  Resuming flushes the meter's whole backlog to the host
  (§5.1), so the meter is always protected and the host absorbs the excess.

The governor is a plain state machine (no thread, no I/O, no clock of its own): the caller
passes the time and the counts and sends the command it returns.  Nothing is dropped:
pausing only moves where samples wait.

Limits: the fill estimate is rate x paused time minus what arrived (the session's), so it is
off by the bytes in flight when the pause took effect (a few hundred kB at most on a LAN);
``max_fill`` defaults to 25 % to leave that margin and the time of one poll.  "Caught up"
after a resume is judged over that short window only, so crystal drift does not accumulate.
Bursty rates (§4.3) deliver a second's samples at once; the backlog bounds are then
compared with bursts of ``rate`` samples.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ..client import BufferFill

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
    """When to pause and resume one ``cts`` session (see the module docstring).

    Construct it when the paused session exists (§5.1: ``flowCtr`` sessions start paused),
    call :meth:`released` once the meter was resumed, then :meth:`decide` every ``poll_s``
    and tell it what was sent with :meth:`paused_at` / :meth:`resumed_at`.
    """

    def __init__(
        self, policy: CtsPolicy, *, rate: int, chunk_samples: int, bytes_per_sample: int,
        label: str,
    ) -> None:
        self.policy = policy
        self._bytes_per_sample = bytes_per_sample
        self._label = label
        self._rate = max(1, int(rate))
        self._pause_at = max(1, int(policy.pause_backlog_s * self._rate))
        self._resume_at = int(policy.resume_backlog_s * self._rate)
        self._tolerance = max(int(CATCH_UP_TOLERANCE_S * self._rate), 2 * chunk_samples)
        self.paused = True
        self._paused_since: float | None = None
        self._caught_up = True
        self._resume_t = 0.0
        self._resume_received = 0
        self._resume_fill_samples = 0
        self._pauses = 0
        self._resumes_backlog = 0
        self._resumes_fill = 0
        self._paused_total = 0.0
        self._max_backlog = 0
        self._max_fill = 0.0

    def decide(
        self, now: float, *, received: int, consumed: int, fill: BufferFill
    ) -> tuple[bool, str, int] | None:
        """The ``cts`` value to send now, why, and the fill in samples (None: nothing)."""
        backlog = received - consumed
        self._max_backlog = max(self._max_backlog, backlog)
        if self.paused:
            self._max_fill = max(self._max_fill, fill.fraction)
            fill_samples = fill.bytes // self._bytes_per_sample
            if fill.fraction >= self.policy.max_fill:
                logger.info(
                    "%s: resuming with %d samples still unwritten: the paused meter's ring "
                    "buffer is about %.0f %% full (§4.10)",
                    self._label, backlog, 100 * fill.fraction,
                )
                self._resumes_fill += 1
                return True, "fill", fill_samples
            if backlog <= self._resume_at:
                self._resumes_backlog += 1
                return True, "backlog", fill_samples
            return None
        if not self._caught_up:
            expected = self._resume_fill_samples + self._rate * (now - self._resume_t)
            if received - self._resume_received >= expected - self._tolerance:
                self._caught_up = True
        if self._caught_up and backlog >= self._pause_at:
            logger.info("%s: pausing the meter (cts false): %d samples not written yet",
                        self._label, backlog)
            return False, "backlog", 0
        return None

    def paused_at(self, now: float) -> None:
        self.paused = True
        self._paused_since = now
        self._pauses += 1

    def resumed_at(self, now: float, *, received_before: int, fill_samples: int) -> None:
        """The meter was resumed; ``received_before`` was counted before ``cts true`` was sent
        (its flush may arrive before the reply)."""
        if self._paused_since is not None:
            self._paused_total += now - self._paused_since
        self.paused = False
        self._paused_since = None
        self._caught_up = False
        self._resume_t = now
        self._resume_received = received_before
        self._resume_fill_samples = fill_samples

    def stats(self, now: float) -> FlowStats:
        paused = self._paused_total
        if self.paused and self._paused_since is not None:
            paused += now - self._paused_since
        return FlowStats(
            pauses=self._pauses,
            resumes_on_backlog=self._resumes_backlog,
            resumes_on_fill=self._resumes_fill,
            paused_s=paused,
            max_backlog_samples=self._max_backlog,
            max_fill=self._max_fill,
        )
