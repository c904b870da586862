"""The start instant (§6.4) as pure arithmetic, judged by the firmware's own window rule.

Each property test draws a situation (host clock, host offset, meter clock errors within
their confidences, the firmware's random pre-start wait, the in-``sample`` sync time, the
link latency) and replays what the firmware does with the chosen ``T``: ``delta_ms =
(T - now_s) * 1000 - now_ms`` in unsigned 32-bit arithmetic, accepted when 500..20000.  The
device's own check on the host clock (0.5 < T - host <= 20) is replayed too.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plans._errors import StartScheduleError
from plans._start import PRE_START_WAIT_S, SAMPLE_NTP_S, StartBudget, choose_start

BUDGET = StartBudget()


def firmware_accepts(start_time: int, meter_now: float) -> bool:
    """§6.4 step 1-2, as the firmware computes it (unsigned 32-bit milliseconds)."""
    now_s = math.floor(meter_now)
    now_ms = int((meter_now - now_s) * 1000)
    delta_ms = ((start_time - now_s) * 1000 - now_ms) % 2**32
    return 500 <= delta_ms <= 20000


def device_accepts(start_time: int, host_now: float) -> bool:
    lead = start_time - host_now
    return 0.5 < lead <= 20.0


situations = st.fixed_dictionaries({
    "host_now": st.floats(1.7e9, 1.8e9),
    "offset": st.floats(-15.0, 15.0),
    "confidences": st.lists(st.floats(0.0, 50.0), min_size=1, max_size=5),
    "delays": st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1),
                                 st.floats(-1, 1), st.floats(0, 1)), min_size=5, max_size=5),
})


@settings(max_examples=150, deadline=None)
@given(situations)
def test_every_meter_and_the_device_accept_the_chosen_start(case) -> None:
    confs = {f"m{i}": c for i, c in enumerate(case["confidences"])}
    choice = choose_start(case["host_now"], confs, host_offset_s=case["offset"])
    start = choice.start_time
    assert isinstance(start, int)
    server_now = case["host_now"] + case["offset"]
    allowed = BUDGET.for_meters(len(confs)).dispatch_s
    for (name, conf), (dispatch, latency, wait, error, sync) in zip(
        confs.items(), case["delays"], strict=False
    ):
        # the command leaves within the dispatch allowance, crosses the link, the meter
        # waits 0-199 ms and syncs (<= 200 ms); its clock is then off by at most conf
        check_at = server_now + dispatch * allowed + latency * BUDGET.link_latency_s \
            + wait * PRE_START_WAIT_S + sync * SAMPLE_NTP_S
        meter_now = check_at + error * conf / 1000
        assert firmware_accepts(start, meter_now), (name, start - meter_now)
    device_at = case["host_now"] + case["delays"][0][0] * allowed
    assert device_accepts(start, device_at)


@settings(max_examples=100, deadline=None)
@given(st.floats(1.7e9, 1.8e9), st.integers(1, 80), st.floats(0, 10), st.floats(0, 1))
def test_a_fleet_is_given_the_time_its_commands_take_to_go_out(host_now, count, conf,
                                                               wait) -> None:
    # The RunEngine prepares the meters one by one: the last command leaves up to
    # dispatch_s + count * dispatch_per_meter_s after T was chosen (50 meters measured at
    # 0.43-0.96 s on 2-core hosts); that meter, the slowest to check, must still accept T.
    confs = {f"m{i}": conf for i in range(count)}
    choice = choose_start(host_now, confs)
    last_out = BUDGET.dispatch_s + count * BUDGET.dispatch_per_meter_s
    check_at = host_now + last_out + BUDGET.link_latency_s + wait * PRE_START_WAIT_S \
        + SAMPLE_NTP_S + conf / 1000
    assert firmware_accepts(choice.start_time, check_at)
    assert device_accepts(choice.start_time, host_now + last_out)
    if count == 50:
        assert last_out >= 0.96


@settings(max_examples=100, deadline=None)
@given(st.floats(1.7e9, 1.8e9), st.floats(-10, 10), st.floats(0, 20))
def test_the_automatic_start_is_the_earliest_safe_second(host_now, offset, conf) -> None:
    choice = choose_start(host_now, {"m1": conf}, host_offset_s=offset)
    # one second earlier, the worst case (slowest path, clock fast) misses the window
    server_now = host_now + offset
    # (+1 ms: the firmware truncates its clock to whole ms, which can hide 0.999 ms)
    dispatch = BUDGET.for_meters(1).dispatch_s
    worst = server_now + dispatch + BUDGET.meter_delay_s + conf / 1000 + 0.001
    earlier = choice.start_time - 1
    assert not (firmware_accepts(earlier, worst) and device_accepts(earlier, host_now + dispatch))


def test_host_offset_shifts_the_start_onto_the_server_clock() -> None:
    host_now = 1_750_000_000.25
    # (a host clock ahead of the server would let the device's own check bind instead)
    ahead = choose_start(host_now, {"m1": 1.0}, host_offset_s=+3.0)
    less = choose_start(host_now, {"m1": 1.0}, host_offset_s=+1.0)
    assert ahead.start_time - less.start_time == 2
    assert ahead.server_now == pytest.approx(host_now + 3.0)


def test_a_host_clock_beyond_the_window_is_refused_naming_the_offset() -> None:
    host_now = 1_750_000_000.0
    with pytest.raises(StartScheduleError, match=r"host clock is off by \+25\.000 s") as info:
        choose_start(host_now, {"m1": 1.0, "m2": 2.0}, host_offset_s=25.0)
    assert "m1" in str(info.value) and "m2" in str(info.value)
    assert info.value.meters == ("m1", "m2")
    with pytest.raises(StartScheduleError, match=r"off by -20\.000 s"):
        choose_start(host_now, {"m1": 1.0}, host_offset_s=-20.0)


def test_the_limit_of_the_host_offset_is_where_the_windows_stop_overlapping() -> None:
    host_now = 1_750_000_000.0
    conf = 1.0
    # largest offset: server ahead by so much that the meters' earliest T is the device's latest
    limit = BUDGET.window_max_s - (BUDGET.for_meters(1).dispatch_s + BUDGET.meter_delay_s
                                   + conf / 1000 + BUDGET.window_min_s)
    inside = choose_start(host_now, {"m1": conf}, host_offset_s=limit - 1.0)
    assert device_accepts(inside.start_time, host_now)
    with pytest.raises(StartScheduleError, match="host clock is off"):
        choose_start(host_now, {"m1": conf}, host_offset_s=limit + 0.01)


@pytest.mark.parametrize("start_in", [0.6, 0.85, 19.95, 20.0])
def test_start_in_outside_a_window_names_the_allowed_range(start_in) -> None:
    host_now = 1_750_000_000.1  # 0.6 and 0.85 give T 0.9 s ahead; 19.95 and 20.0 20.9 s
    with pytest.raises(StartScheduleError, match=r"start_in=.* allowed: 1\.\d+ to 19\.\d+ s ahead"):
        choose_start(host_now, {"m1": 1.0}, start_in=start_in)


def test_start_in_picks_the_first_whole_second_that_far_ahead() -> None:
    host_now = 1_750_000_000.5
    choice = choose_start(host_now, {"m1": 1.0, "m2": 4.0}, start_in=5.0)
    assert choice.start_time == math.ceil(host_now + 5.0)
    choice = choose_start(host_now, {"m1": 1.0}, start_in=19.0, host_offset_s=0.2)
    assert choice.start_time == math.ceil(host_now + 0.2 + 19.0)


def test_a_poor_confidence_narrows_that_meters_window() -> None:
    host_now = 1_750_000_000.0
    poor = choose_start(host_now, {"m1": 1.0, "m2": 150.0})
    good = poor.windows["m1"]
    narrower = pytest.approx(0.149, abs=1e-6)
    assert poor.windows["m2"].earliest - good.earliest == narrower
    assert good.latest - poor.windows["m2"].latest == narrower
    assert poor.earliest == poor.windows["m2"].earliest
