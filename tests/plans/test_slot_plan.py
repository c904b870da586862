"""Slot plans (§5.3) as pure arithmetic, judged against the limits they must respect.

Each accepted plan is re-checked here from first principles: a meter holds ``slots``
seconds of data (plus a chunk) before its slot and must stay under the ring-buffer share
(§4.10: overflow reboots); it must send that within one second; the meters of one slot send
together and must fit the link.  Refusals must name the meter and the figure.
"""

from __future__ import annotations

import pytest

from plans._errors import SlotPlanError
from plans._slots import MeterLoad, plan_slots
from smartmeter_ophyd.protocol import RING_BUFFER_BYTES, Measures

MBIT = 1e6 / 8


def assert_within_limits(plan, loads, *, link, meter, fraction=0.5) -> None:
    limit = RING_BUFFER_BYTES * fraction
    assert sorted(plan.assignment) == sorted(loads)
    assert set(plan.assignment.values()) <= set(range(plan.slots))
    for name, load in loads.items():
        rate_bytes = load.rate * load.measures.bytes_per_sample
        assert plan.slots * rate_bytes + load.chunk_bytes <= limit, name
        assert plan.slots * rate_bytes <= meter, name
    for slot in range(plan.slots):
        together = sum(plan.slots * loads[n].rate * loads[n].measures.bytes_per_sample
                       for n, s in plan.assignment.items() if s == slot)
        assert together <= link, slot


def fits(loads, slots, *, link, meter, fraction=0.5) -> bool:
    try:
        plan_slots(loads, link_bytes_per_s=link, meter_bytes_per_s=meter,
                   buffer_fraction=fraction, slots=slots)
    except SlotPlanError:
        return False
    return True


def test_few_meters_get_a_slot_each() -> None:
    loads = {f"m{i}": MeterLoad(8000, Measures.VI) for i in range(4)}
    plan = plan_slots(loads, link_bytes_per_s=10 * MBIT, meter_bytes_per_s=8 * MBIT)
    assert plan.slots == 4
    assert sorted(plan.assignment.values()) == [0, 1, 2, 3]
    assert plan.slot_of("m2") == (plan.assignment["m2"], 4)
    assert_within_limits(plan, loads, link=10 * MBIT, meter=8 * MBIT)


def test_many_meters_share_slots_as_the_meters_sending_limits() -> None:
    loads = {f"m{i:02d}": MeterLoad(8000, Measures.VI) for i in range(20)}
    plan = plan_slots(loads, link_bytes_per_s=100 * MBIT, meter_bytes_per_s=8 * MBIT)
    assert_within_limits(plan, loads, link=100 * MBIT, meter=8 * MBIT)
    # the largest number of slots that fits: one more breaks a limit
    assert not fits(loads, plan.slots + 1, link=100 * MBIT, meter=8 * MBIT)
    per_slot = [list(plan.assignment.values()).count(s) for s in range(plan.slots)]
    assert max(per_slot) - min(per_slot) <= 1


def test_mixed_rates_are_balanced_by_bytes() -> None:
    loads = {"fast": MeterLoad(32000, Measures.VI_L1), "a": MeterLoad(8000, Measures.VI_L1),
             "b": MeterLoad(8000, Measures.VI_L1), "c": MeterLoad(16000, Measures.VI_L1)}
    plan = plan_slots(loads, link_bytes_per_s=10 * MBIT, meter_bytes_per_s=8 * MBIT, slots=2)
    assert_within_limits(plan, loads, link=10 * MBIT, meter=8 * MBIT)
    assert plan.assignment["fast"] != plan.assignment["c"]
    assert plan.slot_bytes_per_s[0] == plan.slot_bytes_per_s[1]


def test_a_slot_plan_that_would_overflow_the_ring_buffer_is_refused() -> None:
    loads = {"m1": MeterLoad(32000, Measures.VI), "m2": MeterLoad(32000, Measures.VI),
             "m3": MeterLoad(32000, Measures.VI)}
    with pytest.raises(SlotPlanError, match=r"m\d: holds \d+ bytes .* ring buffer") as info:
        plan_slots(loads, link_bytes_per_s=100 * MBIT, meter_bytes_per_s=100 * MBIT, slots=3)
    assert set(info.value.meters) == {"m1", "m2", "m3"}
    assert 3 * 32000 * 24 > RING_BUFFER_BYTES / 2  # the refusal is real, not conservative


def test_a_meter_that_cannot_send_its_share_in_its_slot_is_refused() -> None:
    loads = {"m1": MeterLoad(8000, Measures.VI), "m2": MeterLoad(8000, Measures.VI)}
    with pytest.raises(SlotPlanError, match=r"m\d: must send 384000 B within its 1 s slot"):
        plan_slots(loads, link_bytes_per_s=100 * MBIT, meter_bytes_per_s=0.3e6, slots=2)
    plan = plan_slots(loads, link_bytes_per_s=100 * MBIT, meter_bytes_per_s=0.3e6)
    assert plan.slots == 1  # both send every second, each 192000 B/s


def test_more_data_than_the_link_carries_is_refused_before_slotting() -> None:
    loads = {f"m{i}": MeterLoad(8000, Measures.VI) for i in range(10)}
    with pytest.raises(SlotPlanError, match=r"1920000 B/s together, more than the link"):
        plan_slots(loads, link_bytes_per_s=10 * MBIT, meter_bytes_per_s=8 * MBIT)
