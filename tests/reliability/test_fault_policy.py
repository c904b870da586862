"""The user's fault policy of ``synchronized_fly`` (issue 9): ``on_fault="fail"`` fails the
run loudly on a lost connection; ``on_fault="continue"`` records what arrived as a segment,
waits for the link and records the rest as a new synchronized segment.  Either way every
sample the meters sent (the emulator's ground truth, per session) is recorded or declared.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import plans
from smartmeter_ophyd.cli._summary import run_summary as cli_summary
from smartmeter_ophyd.readback import meter_rows
from smartmeter_ophyd.storage import read_stream

from ._support import assert_idle, when_sampling


def test_an_unknown_policy_is_refused_before_any_meter_is_touched(fleet_factory, smartmeters):
    fleet = fleet_factory(1)
    with pytest.raises(plans.PlanArgumentError, match="on_fault='retry'.*'fail', 'continue'"):
        list(plans.synchronized_fly(smartmeters(fleet), 1.0, on_fault="retry"))


@pytest.mark.parametrize("fault", ["drop_connections", "reboot"])
def test_continue_records_a_new_segment_after_the_connection_comes_back(
    fleet_factory, smartmeters, engine, embedded_catalog, fault
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    sent_before: list[list[int]] = []  # ground truth of every finished session, per prepare
    hook = engine.RE.msg_hook

    def record_truth(msg: Any) -> None:
        hook(msg)
        if msg.command == "prepare" and engine.commands("complete"):
            sent_before.append([fleet.truth(i).sent_samples for i in range(2)])

    engine.RE.msg_hook = record_truth
    duration = 3.0
    thread = when_sampling(engine, lambda: fleet.inject(1, fault), after_s=0.8)
    started = time.monotonic()
    (uid,) = engine.RE(plans.synchronized_fly(meters, duration, on_fault="continue"))
    took = time.monotonic() - started
    thread.join(10)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success", stop
    assert_idle(fleet)
    run = embedded_catalog.client[uid]
    sync = meter_rows(run["synchronization"].read())
    assert [row["segment"] for row in sync["m1"]] == [0, 1]
    starts = [row["scheduled_start"] for row in sync["m1"]]
    assert starts[1] > starts[0]  # the boundary: a new common start
    table = meter_rows(run["meter_summary"].read())  # one row per meter and segment
    assert sorted(table) == ["m1", "m2"]
    first = sent_before[0]
    for i, meter in enumerate(meters):
        rows = table[meter.name]
        assert [row["segment"] for row in rows] == [0, 1]
        received = np.array([row["received_samples"] for row in rows])
        missing = np.array([row["missing_samples"] for row in rows])
        assert received[0] + missing[0] == first[i], (meter.name, received, missing, first)
        assert received[1] + missing[1] == fleet.truth(i).sent_samples
        stored = read_stream(run, meter.name, prefix=meter.name).sizes["time"]
        assert stored == received.sum()
    # the lost meter's first segment ended without a stop reply, and says so
    assert "connection lost" in table["m2"][0]["summary"]
    assert table["m2"][0]["device_sent_samples"] == -1 and not table["m2"][0]["explained"]
    # the CLI's summary: counts over both segments, a count the meter never gave stays unknown
    printed = cli_summary(run)["meters"]
    for meter in meters:
        assert printed[meter.name]["samples"] == sum(
            row["received_samples"] for row in table[meter.name])
    assert printed["m2"]["meter_sent"] == -1 and printed["m2"]["explained"] is False
    assert printed["m1"]["start_ts"] == table["m1"][0]["start_ts"]  # the first segment's
    # the rest of the duration was recorded: segment lengths add up to the duration
    summary = meters[1].last_summary
    seg1 = summary.stop_ts - summary.start_ts
    assert seg1 + first[1] / 8000 >= duration - 0.05
    assert took < 60


def test_fail_is_the_default_and_ends_the_run_with_the_meters_error(
    fleet_factory, smartmeters, engine
) -> None:
    fleet = fleet_factory(1)
    meters = smartmeters(fleet)
    thread = when_sampling(engine, lambda: fleet.inject(0, "drop_connections"))
    with pytest.raises(Exception, match="connection lost") as info:
        engine.RE(plans.synchronized_fly(meters, 3.0))
    thread.join(10)
    assert meters[0].meter_label in str(info.value)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail"
    assert len(engine.commands("kickoff")) == 1  # no second segment
