"""``synchronized_fly`` in a RunEngine: emulated meters over real sockets, NTP from the real
chrony on loopback, documents into the session's embedded catalog.

Timing is judged against the emulator's ground truth (``EmulatorFleet.truth``: the true
instant each session started), never against what the plan or the device computed.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

import plans
from plans import NtpGateError, StartScheduleError
from plans._settle import Settling
from smartmeter_ophyd.devices import HostClock, MeterSummary
from smartmeter_ophyd.readback import meter_rows
from smartmeter_ophyd.storage import read_stream

GATE_MS = 5.0


def ntp_triggers(engine, meter):
    """Times of the plan's NTP syncs of ``meter`` (trigger messages on its ``ntp``)."""
    return [t for t, msg in engine.commands("trigger")
            if isinstance(msg.obj, Settling) and msg.obj.device is meter.ntp]


def never_sampled(fleet) -> bool:
    for name in fleet.names:
        try:
            fleet.truth(name)
        except LookupError:
            continue
        return False
    return True


def test_three_meters_pass_the_gate_and_start_on_one_instant(
    fleet_factory, smartmeters, engine, embedded_catalog, ntp_server
) -> None:
    fleet = fleet_factory([
        {"clock_offset_s": -0.5, "drift_ppm": -50.0},
        {"clock_offset_s": 0.0, "drift_ppm": 0.0},
        {"clock_offset_s": 0.5, "drift_ppm": 50.0},
    ])
    meters = smartmeters(fleet)
    clock = HostClock(*ntp_server, name="host_clock")
    (uid,) = engine.RE(plans.synchronized_fly(meters, 1.0, ntp_confidence_ms=GATE_MS,
                                              host_clock=clock, md={"purpose": "test"}))

    (start,) = engine.docs("start")
    sync = start["synchronization"]
    assert start["purpose"] == "test" and start["plan_name"] == "synchronized_fly"
    for meter in meters:
        gate = sync["gate"][meter.name]
        assert gate["passed"] and 0 <= gate["confidences_ms"][-1] <= GATE_MS
    assert abs(sync["host_clock"]["offset_s"]) < 0.01  # chrony serves this host's clock

    # the alignment's reference (the first meter) has its file finished first when the
    # meters end together: the others' alignment waits for it
    prepared = {(msg.obj.name, msg.args[0].finish_first) for _, msg in engine.commands("prepare")}
    assert prepared == {(meters[0].name, True)} | {(m.name, False) for m in meters[1:]}

    # every gate sync happened before anything armed or started a meter
    first_kickoff = min(t for t, _ in engine.commands("kickoff"))
    first_arm = min(t for t, msg in engine.commands("prepare")
                    if getattr(msg.args[0], "start_time", None) is not None)
    for meter in meters:
        syncs = ntp_triggers(engine, meter)
        assert syncs and max(syncs) < first_arm < first_kickoff

    # one stream per meter, each with its gaps and timing streams, plus the two summaries
    expected = {f"{m.name}{suffix}" for m in meters for suffix in ("", "_gaps", "_timing")}
    streams = {d["name"] for d in engine.docs("descriptor")}
    # plus the live view ('primary', once a second of samples is in) and the alignment
    assert streams - {"primary"} == expected | {"synchronization", "meter_summary", "alignment"}
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success", stop

    # the end-of-run records are long tables: the same columns whatever the fleet size, one
    # row per meter, in one page each
    pages = {}
    for name, columns in (("synchronization", set(plans._fly.SYNC_COLUMNS)),
                          ("meter_summary", set(MeterSummary().columns))):
        (descriptor,) = [d for d in engine.docs("descriptor") if d["name"] == name]
        assert set(descriptor["data_keys"]) == columns
        assert descriptor["configuration"] == {name: {"data": {}, "timestamps": {},
                                                      "data_keys": {}}}
        (page,) = [p for p in engine.docs("event_page") if p["descriptor"] == descriptor["uid"]]
        assert page["data"]["meter"] == [m.name for m in meters]
        pages[name] = meter_rows(page["data"])
    run = embedded_catalog.client[uid]
    assert meter_rows(run["synchronization"].read()) == pages["synchronization"]
    for i, meter in enumerate(meters):
        (values,) = pages["synchronization"][meter.name]
        T = values["scheduled_start"]
        assert T == int(T) and T == pages["synchronization"][meters[0].name][0]["scheduled_start"]
        assert values["segment"] == 0 and values["gate_attempts"] >= 1
        assert values["host_offset_s"] == sync["host_clock"]["offset_s"]
        assert meter.last_sample_reply.raw_fields["startTs"] == f"{int(T)}.000"  # §6.4
        truth = fleet.truth(i)
        summary = meter.last_summary
        # the stored start is the stop reply's start_ts (§6.4 step 5), which is the truth's
        assert truth.reported_start_ts == f"{summary.start_ts:.3f}"
        conf_s = values["sample_ntp_confidence_ms"] / 1000
        assert math.isfinite(conf_s), "the sync inside `sample` was not recorded"
        assert abs(truth.true_start - (T - 0.001)) <= conf_s + 0.001
        # the catalog holds every sample received, in this meter's own stream
        ds = read_stream(run, meter.name, prefix=meter.name)
        assert ds.sizes["time"] == summary.received_samples
        assert abs(float(ds["time"].values[0]) - summary.start_ts) < 1e-6
        timing = run[f"{meter.name}_timing"].read()
        assert timing.sizes["time"] >= 1

        # the recorded confidences are the meter's own syncs (the emulator's SNTP history),
        # and every sync left the clock within its confidence + 1 ms of true time
        history = fleet.ntp_history(i)
        gate_syncs = [h for h in history if min(ntp_triggers(engine, meter)) <= h.true_time
                      < first_arm]
        assert [h.confidence_ms for h in gate_syncs] == sync["gate"][meter.name]["confidences_ms"]
        (in_sample,) = [h for h in history if first_arm <= h.true_time < truth.true_start]
        assert in_sample.confidence_ms == values["sample_ntp_confidence_ms"]
        for h in [*gate_syncs, in_sample]:
            assert abs(h.error_s) <= h.confidence_ms / 1000 + 0.001, h


def test_a_meter_above_the_gate_fails_the_plan_before_any_sample(
    fleet_factory, smartmeters, engine
) -> None:
    fleet = fleet_factory([{}, {"network_delay_s": 0.02}])  # conf = half the 40 ms round trip
    meters = smartmeters(fleet)
    with pytest.raises(NtpGateError) as info:
        engine.RE(plans.synchronized_fly(meters, 1.0, ntp_confidence_ms=GATE_MS, ntp_attempts=2))
    message = str(info.value)
    assert "1 of 2 meters did not reach a confidence of at most 5 ms in 2 attempts" in message
    slow = next(line for line in message.splitlines() if meters[1].meter_label in line)
    assert slow.count(" ms") == 3 and slow.endswith("above 5 ms")  # two attempts and the limit
    assert all(c > GATE_MS for c in info.value.results["m2"].confidences_ms)
    assert info.value.results["m1"].passed
    assert len(ntp_triggers(engine, meters[1])) == 2  # exactly ntp_attempts syncs
    assert len(ntp_triggers(engine, meters[0])) == 1  # a meter that passed is not re-synced
    assert not engine.commands("prepare") and not engine.docs("start")
    assert never_sampled(fleet)
    assert [msg.obj for _, msg in engine.commands("unstage")] == meters[::-1]


def test_a_host_clock_off_beyond_the_window_schedules_nothing(
    fleet_factory, smartmeters, engine
) -> None:
    # the meters and the host clock device both use the fleet's time server, 25 s ahead
    fleet = fleet_factory(2, chrony=False, time_offset_s=25.0)
    meters = smartmeters(fleet)
    clock = HostClock(*fleet.sntp_address, name="host_clock")
    with pytest.raises(StartScheduleError, match=r"host clock is off by \+25\.0\d\d s") as info:
        engine.RE(plans.synchronized_fly(meters, 1.0, host_clock=clock))
    assert "Fix the host's NTP" in str(info.value)
    assert not engine.commands("prepare") and not engine.docs("start")
    assert never_sampled(fleet)


def test_an_immediate_start_records_every_meter(fleet_factory, smartmeters, engine,
                                                embedded_catalog) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    (uid,) = engine.RE(plans.synchronized_fly(meters, 0.5, start_in=0,
                                              rate={"m1": 8000, "m2": 1000}))
    run = embedded_catalog.client[uid]
    sync = meter_rows(run["synchronization"].read())
    for i, meter in enumerate(meters):
        (row,) = sync[meter.name]
        assert np.isnan(row["scheduled_start"]) and np.isnan(row["start_margin_s"])
        assert np.isnan(row["host_offset_s"])  # no host clock given: not measured, not 0
        summary = meter.last_summary
        assert summary.explained
        ds = read_stream(run, meter.name, prefix=meter.name)
        assert ds.sizes["time"] == summary.received_samples >= (4000 if i == 0 else 500)
    assert run.start["synchronization"]["scheduled"] is False


def test_progress_bars_and_best_effort_callback_follow_a_fly(
    fleet_factory, smartmeters, engine, caplog
) -> None:
    """With ``RE.waiting_hook = ProgressBarManager()`` the meters' bars last the whole fly: the
    live view's reads open no second wait (that would replace them, with bluesky's "Previous
    ProgressBar never competed" warning, an error in this suite)."""
    from bluesky.callbacks.best_effort import BestEffortCallback
    from bluesky.utils import ProgressBarManager

    calls: list[object] = []
    manager = ProgressBarManager()

    def hook(statuses: object) -> None:
        calls.append(statuses)
        manager(statuses)

    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    engine.RE.waiting_hook = hook
    bec = BestEffortCallback()  # it warns (an error here) on hints it cannot follow
    bec.disable_plots()
    engine.RE.subscribe(bec)
    engine.RE(plans.synchronized_fly(meters, 2.5))
    failed = [r for r in caplog.records if r.name.startswith("bluesky.callbacks")
              and r.levelno >= logging.ERROR]  # the RunEngine logs a callback's exceptions
    assert not failed, failed[0].getMessage()
    assert any(d["name"] == "primary" for d in engine.docs("descriptor"))
    completes = [c for c in calls if c is not None and len(c) == len(meters)]
    assert completes, calls
