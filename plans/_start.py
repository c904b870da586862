"""Choosing one scheduled start instant for several meters (§6.4): pure arithmetic, no I/O.

A scheduled ``sample`` carries ``time = T`` (integer unix seconds).  Each meter, on receipt,
waits a random 0-199 ms, runs a blocking NTP sync (at most 200 ms, §6.2), and only then
checks ``500 ms <= T - now <= 20 s`` on its own clock.  The device also checks the window on
the *host* clock before it sends anything.  So ``T`` must lie inside:

* every meter's window, allowing for the time to get the commands out (``dispatch_s``, and
  ``dispatch_per_meter_s`` for each meter), the
  link latency, the pre-start wait, the in-``sample`` sync, the meter's clock error (its NTP
  confidence) and the uncertainty of the host offset;
* the host-clock window of the device's own check.

Times here are the time server's (= the meters' clocks, after NTP): ``server = host + offset``
with ``offset`` as measured by :class:`~smartmeter_ophyd.devices.HostClock` (server minus
host).  A host clock off by more than the window allows makes both windows disjoint; that is
refused, naming the offset, before any ``sample`` is sent.

Limits: the link latency is an allowance (``link_latency_s``), not a measurement; on a slow
link give a larger one.  ``T`` is an integer second, so the automatic choice lies up to 1 s
after the earliest safe instant.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Self

from ._errors import StartScheduleError

WINDOW_MIN_S = 0.5
"""The firmware starts only if ``T - now >= 500 ms`` (§6.4)."""
WINDOW_MAX_S = 20.0
"""... and ``T - now <= 20 000 ms`` (§6.4)."""
PRE_START_WAIT_S = 0.2
"""Random wait before the scheduled start's NTP sync: 0-199 ms (§6.4 step 1)."""
SAMPLE_NTP_S = 0.2
"""The blocking sync inside ``sample`` gives up after 200 ms (§6.2)."""


@dataclass(frozen=True, slots=True)
class StartBudget:
    """Allowances between choosing ``T`` and each meter's window check (seconds)."""

    link_latency_s: float = 0.05
    """One-way host-to-meter latency (a LAN allowance; not measured)."""
    dispatch_s: float = 0.25
    """From choosing ``T`` until the last ``sample`` command is written, before
    ``dispatch_per_meter_s``."""
    dispatch_per_meter_s: float = 0.015
    """Added to ``dispatch_s`` for each meter (:meth:`for_meters`): the RunEngine prepares the
    meters one after another while the first ones' replies and new files compete with it for
    the interpreter.  Measured on 2-core hosts: 20 meters' commands out in 0.09-0.10 s, 50
    meters' in 0.43-0.96 s."""
    pre_start_wait_s: float = PRE_START_WAIT_S
    sample_ntp_s: float = SAMPLE_NTP_S
    window_min_s: float = WINDOW_MIN_S
    window_max_s: float = WINDOW_MAX_S

    def for_meters(self, count: int) -> Self:
        """This budget for ``count`` meters: ``dispatch_s`` grown by ``dispatch_per_meter_s``
        per meter (and that allowance then spent)."""
        return replace(self, dispatch_s=self.dispatch_s + count * self.dispatch_per_meter_s,
                       dispatch_per_meter_s=0.0)

    @property
    def meter_delay_s(self) -> float:
        """Longest time from the command leaving the host to the meter's window check."""
        return self.link_latency_s + self.pre_start_wait_s + self.sample_ntp_s


@dataclass(frozen=True, slots=True)
class MeterWindow:
    """Where ``T`` may lie for one meter (server time, seconds)."""

    earliest: float
    latest: float


@dataclass(frozen=True, slots=True)
class StartChoice:
    """The chosen start and how it was derived (all instants in server time, seconds)."""

    start_time: int
    """``T``: integer unix seconds on the meters' (NTP-set) clocks."""
    server_now: float
    """Host time when ``T`` was chosen, plus the host offset."""
    host_offset_s: float
    earliest: float
    """The earliest instant every window allows."""
    latest: float
    """The latest instant every window allows."""
    windows: dict[str, MeterWindow] = field(default_factory=dict)
    host_window: MeterWindow | None = None
    """The device's own check, by the host clock, expressed in server time."""

    @property
    def lead_s(self) -> float:
        """How far ahead of the choice ``T`` lies (server time)."""
        return self.start_time - self.server_now

    def as_dict(self) -> dict[str, float | int]:
        return {
            "start_time": self.start_time,
            "lead_s": round(self.lead_s, 6),
            "earliest": round(self.earliest, 6),
            "latest": round(self.latest, 6),
            "host_offset_s": self.host_offset_s,
        }


def meter_window(
    server_now: float,
    confidence_s: float,
    *,
    host_offset_uncertainty_s: float = 0.0,
    budget: StartBudget = StartBudget(),
) -> MeterWindow:
    """The instants ``T`` one meter certainly accepts, if asked at ``server_now``.

    Earliest: the meter may check as late as dispatch + latency + wait + sync after
    ``server_now`` and its clock may be ``confidence_s`` fast.  Latest: it may check at once
    with a clock ``confidence_s`` slow.  ``host_offset_uncertainty_s`` widens both sides.
    """
    slack = confidence_s + host_offset_uncertainty_s
    earliest = server_now + budget.dispatch_s + budget.meter_delay_s + slack + budget.window_min_s
    latest = server_now - slack + budget.window_max_s
    return MeterWindow(earliest, latest)


def host_window(host_now: float, budget: StartBudget) -> MeterWindow:
    """The device's own window check: it compares ``T`` with the *host* clock before sending."""
    return MeterWindow(host_now + budget.dispatch_s + budget.window_min_s,
                       host_now + budget.window_max_s)


def allowed_host_offsets(windows: Mapping[str, MeterWindow], server_now: float,
                         own: MeterWindow, host_offset_s: float) -> tuple[float, float]:
    """The host offsets for which the meters' windows and the host-clock window overlap."""
    host_now = server_now - host_offset_s
    ahead_min = max(w.earliest for w in windows.values()) - server_now
    ahead_max = min(w.latest for w in windows.values()) - server_now
    return (own.earliest - host_now - ahead_max, own.latest - host_now - ahead_min)


def choose_start(
    host_now: float,
    confidences_ms: Mapping[str, float],
    *,
    host_offset_s: float = 0.0,
    host_offset_uncertainty_s: float = 0.0,
    start_in: float | None = None,
    budget: StartBudget = StartBudget(),
) -> StartChoice:
    """Pick ``T`` for meters whose clocks are good to ``confidences_ms`` (name -> ms).

    ``start_in`` (seconds, server time) asks for the first whole second at least that far
    ahead; None picks the earliest safe second.  Raises :class:`StartScheduleError` naming
    the meter (or the host offset) that leaves no room.
    """
    if not confidences_ms:
        raise StartScheduleError("choose_start: no meters given")
    budget = budget.for_meters(len(confidences_ms))
    server_now = host_now + host_offset_s
    windows = {
        name: meter_window(
            server_now, conf / 1000.0,
            host_offset_uncertainty_s=host_offset_uncertainty_s, budget=budget,
        )
        for name, conf in confidences_ms.items()
    }
    own = host_window(host_now, budget)
    bounds = [*windows.values(), own]
    earliest = max(w.earliest for w in bounds)
    latest = min(w.latest for w in bounds)
    if start_in is None:
        start = math.ceil(earliest)
    else:
        start = math.ceil(server_now + start_in)
    choice = StartChoice(
        start_time=start, server_now=server_now, host_offset_s=host_offset_s,
        earliest=earliest, latest=latest, windows=windows, host_window=own,
    )
    if earliest <= start <= latest:
        return choice
    raise StartScheduleError(_explain(choice, start_in), sorted(windows))


def _explain(choice: StartChoice, start_in: float | None) -> str:
    now = choice.server_now
    own = choice.host_window
    assert own is not None
    problems = []
    low, high = allowed_host_offsets(choice.windows, now, own, choice.host_offset_s)
    if not low <= choice.host_offset_s <= high:
        problems.append(
            f"the host clock is off by {choice.host_offset_s:+.3f} s from the time server; the "
            "device checks the start on the host clock and the meters on theirs, and no instant "
            f"fits both (allowed host offset: {low:+.3f} to {high:+.3f} s). Fix the host's NTP"
        )
    elif start_in is not None:
        problems.append(
            f"start_in={start_in!r} gives T={choice.start_time}, {choice.lead_s:.3f} s ahead; "
            f"allowed: {choice.earliest - now:.3f} to {choice.latest - now:.3f} s ahead"
        )
    else:
        problems.append(
            f"no whole second lies between {choice.earliest - now:.3f} and "
            f"{choice.latest - now:.3f} s ahead"
        )
    rows = [
        f"  {name}: T from {w.earliest - now:.3f} to {w.latest - now:.3f} s ahead"
        for name, w in choice.windows.items()
    ]
    rows.append(
        f"  host-clock check: T from {own.earliest - now:.3f} to {own.latest - now:.3f} s ahead"
    )
    return "cannot schedule a common start (§6.4): " + "; ".join(problems) + "\n" + "\n".join(rows)


def replies_in_time(start_time: int, host_now: float, host_offset_s: float) -> float:
    """Seconds by which all replies were in before ``T`` (server time; negative: too late)."""
    return start_time - (host_now + host_offset_s)
