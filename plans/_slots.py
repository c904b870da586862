"""Slot plans for many meters sharing one link (``slot = [slot, slots]``, §5.3): pure arithmetic.

With ``slot = [s, n]`` a meter sends its buffered chunks only while its own UTC second
satisfies ``second % n == s``; the rest of the time it only samples into its ring buffer.
So every meter of slot ``s`` sends about ``n`` seconds of data within one second, while the
meters of the other slots are silent.  Three limits follow:

* **ring buffer** (§4.10): a meter holds up to ``n`` seconds of data before its slot comes
  (plus less than a chunk left over); that must stay below ``buffer_fraction`` of its
  3 670 016 bytes, because the firmware *reboots* on overflow;
* **the meter's own sending**: ``n`` seconds of data must leave it within its one-second slot
  (``meter_bytes_per_s``, an allowance for the ESP32's TCP throughput; measure yours);
* **the shared link**: all meters of one slot send together, ``n x`` their data rate each,
  which must fit ``link_bytes_per_s``.

:func:`plan_slots` picks the largest ``n`` (at most one slot per meter: each meter alone on
the link) that satisfies all three, assigns meters to slots balancing the bytes per slot,
and refuses - naming the meter and the figures - when no ``n`` fits.

Limits: slot boundaries follow each meter's NTP-set clock (the plans gate on NTP first);
without NTP time only slot 0 ever sends (§5.3).  The slot writer sends whole chunks only.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from smartmeter_ophyd.protocol import RING_BUFFER_BYTES, Measures, Transport, chunk_size

from ._errors import SlotPlanError

BUFFER_FRACTION = 0.5
"""Default share of the ring buffer a meter may fill between its slots."""


@dataclass(frozen=True, slots=True)
class MeterLoad:
    """What one meter produces: ``rate`` samples/s of ``measures`` (§4.2, §4.5)."""

    rate: int
    measures: Measures

    @property
    def bytes_per_s(self) -> int:
        return self.rate * self.measures.bytes_per_sample

    @property
    def chunk_bytes(self) -> int:
        return chunk_size(self.rate, self.measures.bytes_per_sample, Transport.TCP)


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """The chosen ``slots`` and each meter's ``slot``, with the figures that justify them."""

    slots: int
    assignment: dict[str, int]
    """Meter name -> its slot (0 .. slots-1)."""
    peak_buffer_bytes: dict[str, int]
    """Meter name -> the most its ring buffer holds just before its slot."""
    slot_bytes_per_s: tuple[int, ...]
    """Per slot: bytes per second the slot's meters send together during it."""
    link_bytes_per_s: float
    meter_bytes_per_s: float
    buffer_limit_bytes: int

    def slot_of(self, name: str) -> tuple[int, int]:
        """The ``[slot, slots]`` pair of meter ``name`` (what ``sample`` gets)."""
        return (self.assignment[name], self.slots)

    def as_dict(self) -> dict[str, object]:
        return {
            "slots": self.slots,
            "assignment": dict(self.assignment),
            "peak_buffer_bytes": dict(self.peak_buffer_bytes),
            "slot_bytes_per_s": list(self.slot_bytes_per_s),
            "link_bytes_per_s": self.link_bytes_per_s,
            "meter_bytes_per_s": self.meter_bytes_per_s,
            "buffer_limit_bytes": self.buffer_limit_bytes,
        }


def _assign(loads: Mapping[str, MeterLoad], slots: int) -> dict[str, int]:
    """Largest data rate first into the slot with the fewest bytes (ties: lowest slot)."""
    totals = [0] * slots
    assignment: dict[str, int] = {}
    for name in sorted(loads, key=lambda n: (-loads[n].bytes_per_s, n)):
        slot = min(range(slots), key=lambda s: (totals[s], s))
        assignment[name] = slot
        totals[slot] += loads[name].bytes_per_s
    return assignment


def _problems(
    loads: Mapping[str, MeterLoad],
    slots: int,
    assignment: Mapping[str, int],
    *,
    link_bytes_per_s: float,
    meter_bytes_per_s: float,
    buffer_limit: int,
) -> list[tuple[str, str]]:
    """(meter, problem) for every limit ``slots`` breaks."""
    found: list[tuple[str, str]] = []
    for name, load in loads.items():
        peak = slots * load.bytes_per_s + load.chunk_bytes
        if peak > buffer_limit:
            found.append((name, (
                f"holds {peak} bytes before its slot ({slots} s x {load.bytes_per_s} B/s), more "
                f"than the {buffer_limit}-byte limit of its ring buffer (§4.10: overflow reboots)"
            )))
        burst = slots * load.bytes_per_s
        if burst > meter_bytes_per_s:
            found.append((name, (
                f"must send {burst} B within its 1 s slot, more than meter_bytes_per_s="
                f"{meter_bytes_per_s:g}"
            )))
    for slot in range(slots):
        members = sorted(n for n, s in assignment.items() if s == slot)
        burst = sum(slots * loads[n].bytes_per_s for n in members)
        if burst > link_bytes_per_s:
            found.append((", ".join(members), (
                f"slot {slot} sends {burst} B/s together, more than link_bytes_per_s="
                f"{link_bytes_per_s:g}"
            )))
    return found


def plan_slots(
    loads: Mapping[str, MeterLoad],
    *,
    link_bytes_per_s: float,
    meter_bytes_per_s: float,
    buffer_fraction: float = BUFFER_FRACTION,
    slots: int | None = None,
) -> SlotPlan:
    """Choose ``slots`` (or check the given one) and assign every meter a slot.

    Raises :class:`SlotPlanError` naming each meter whose ring buffer, own sending or shared
    slot would overflow, with the figures.
    """
    if not loads:
        raise SlotPlanError("plan_slots: no meters given")
    if not 0 < buffer_fraction <= 1:
        raise SlotPlanError(f"buffer_fraction={buffer_fraction!r}; allowed: 0 < x <= 1")
    buffer_limit = int(RING_BUFFER_BYTES * buffer_fraction)
    total = sum(load.bytes_per_s for load in loads.values())
    if total > link_bytes_per_s:
        raise SlotPlanError(
            f"the meters produce {total} B/s together, more than the link's "
            f"link_bytes_per_s={link_bytes_per_s:g}; no slot plan can carry that "
            "(lower the rate, use fewer channels or fewer meters)",
            sorted(loads),
        )
    candidates = [slots] if slots is not None else list(range(len(loads), 0, -1))
    last: list[tuple[str, str]] = []
    for n in candidates:
        assignment = _assign(loads, n)
        last = _problems(loads, n, assignment, link_bytes_per_s=link_bytes_per_s,
                         meter_bytes_per_s=meter_bytes_per_s, buffer_limit=buffer_limit)
        if not last:
            return SlotPlan(
                slots=n,
                assignment=assignment,
                peak_buffer_bytes={
                    name: n * load.bytes_per_s + load.chunk_bytes for name, load in loads.items()
                },
                slot_bytes_per_s=tuple(
                    sum(n * loads[m].bytes_per_s for m, s in assignment.items() if s == slot)
                    for slot in range(n)
                ),
                link_bytes_per_s=link_bytes_per_s,
                meter_bytes_per_s=meter_bytes_per_s,
                buffer_limit_bytes=buffer_limit,
            )
    tried = f"slots={slots}" if slots is not None else f"slots from {len(loads)} down to 1"
    details = "\n".join(f"  {who}: {problem}" for who, problem in last)
    raise SlotPlanError(f"no slot plan fits ({tried}); with {candidates[-1]}:\n{details}",
                        sorted({who for who, _ in last}))
