"""Flow control, slots, periodic NTP, monitoring and settings through the plans, in a
RunEngine against the emulator fleet (NTP from the real chrony).

Every sample a meter sent must be accounted for (the device's reconciled summary) and the
catalog must hold every sample received; corrections are checked against the emulator's
own record of what it duplicated and dropped.
"""

from __future__ import annotations

import gc

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from ophyd.status import StatusBase

import plans
from plans import stubs
from smartmeter_ophyd.readback import meter_rows
from smartmeter_ophyd.storage import read_stream


def assert_all_recorded(run, meters) -> None:
    for meter in meters:
        summary = meter.last_summary
        assert summary is not None and summary.explained, (meter.name, summary)
        assert summary.missing_declared == 0, (meter.name, summary)
        ds = read_stream(run, meter.name, prefix=meter.name)
        assert ds.sizes["time"] == summary.received_samples > 0, meter.name


def test_cts_starts_every_meter_paused_and_releases_them_together(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    (uid,) = engine.RE(plans.synchronized_fly(meters, 1.0, flow_control="cts"))
    assert all(m.last_sample_reply.flow_control is True for m in meters)  # flowCtr (§5.1)
    kickoffs = [msg for _, msg in engine.commands("kickoff")]
    assert len({msg.kwargs["group"] for msg in kickoffs}) == 1  # one release for all
    assert_all_recorded(embedded_catalog.client[uid], meters)
    for i in range(2):
        assert fleet.truth(i).sent_samples == meters[i].last_summary.device_sent_samples


def test_req_samples_at_the_send_buffer_limit_accounts_for_every_sample(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(1)
    meters = smartmeters(fleet)
    (uid,) = engine.RE(plans.synchronized_fly(meters, 1.0, rate=1000, flow_control="reqSamples",
                                              request_size=42))
    assert engine.docs("stop")[-1]["exit_status"] == "success"
    assert_all_recorded(embedded_catalog.client[uid], meters)
    assert fleet.truth(0).sent_samples == meters[0].last_summary.device_sent_samples


def test_slotted_fly_gives_each_meter_its_slot(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    (uid,) = engine.RE(plans.slotted_fly(meters, 1.5, rate=4000))
    run = embedded_catalog.client[uid]
    plan = run.start["slot_plan"]
    assert plan["slots"] == 2 and sorted(plan["assignment"].values()) == [0, 1]
    for meter in meters:
        assert meter.last_sample_reply.slot == (plan["assignment"][meter.name], 2)  # §5.3 echo
    assert_all_recorded(run, meters)


def test_periodic_ntp_during_the_fly_records_every_correction(
    fleet_factory, smartmeters, engine, embedded_catalog, caplog
) -> None:
    fleet = fleet_factory([{"drift_ppm": 50.0}, {"drift_ppm": -50.0}])
    meters = smartmeters(fleet)
    # The loop looks at the sync period once a flush period; each trigger is a full period
    # after the previous one, so none finds the previous sync still running (2-3 in 4 s).
    (uid,) = engine.RE(plans.synchronized_fly(meters, 4.0, ntp_period=1.0))
    assert "still running; skipped" not in caplog.text
    run = embedded_catalog.client[uid]
    sync = meter_rows(run["synchronization"].read())
    for i, meter in enumerate(meters):
        (row,) = sync[meter.name]
        periodic = row["periodic_syncs"]
        assert periodic >= 2 and row["periodic_sync_failures"] == 0
        timing = run[f"{meter.name}_timing"].read()
        during = timing[f"{meter.name}_timing_during_sampling"].values.astype(bool)
        # the sync inside `sample` (idle), then one record per sync the meter ran sampling
        truth = fleet.corrections(i)
        assert not during[0] and 1 <= during.sum() == len(truth.sync_records) <= periodic
        queued = timing[f"{meter.name}_timing_correction"].values[during]
        assert list(queued) == [r.queued for r in truth.sync_records]
        applied = len(truth.duplicates) - len(truth.correction_drops)
        assert int(queued.sum()) == applied + truth.pending, (queued, truth)
    assert_all_recorded(run, meters)
    # The RunEngine keeps what a plan triggered and never waited for until the next plan:
    # none of the syncs (each holds its log lines and record), or a long fly would grow.
    gc.collect()
    for meter in meters:
        syncs = [o for o in gc.get_objects()
                 if isinstance(o, StatusBase) and getattr(o, "device", None) is meter.ntp]
        assert len(syncs) <= 1, (meter.name, len(syncs))  # the last one, kept by meter.ntp


def test_monitor_reads_every_meter_on_a_fixed_schedule(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    (uid,) = engine.RE(plans.monitor(meters, 1.0, 2.0, md={"site": "lab"}))
    run = embedded_catalog.client[uid]
    assert run.start["site"] == "lab" and run.start["num_points"] == 3
    data = run["primary"].read()
    assert data.sizes["time"] == 3
    for meter in meters:
        for key in ("voltage_l1", "current_l3", "active_power_l2", "energy_l1", "frequency_l1"):
            assert np.all(np.isfinite(data[f"{meter.name}_{key}"].values)), key
        assert 200 < float(data[f"{meter.name}_voltage_l1"].values[0]) < 260
    spacing = np.diff(data["time"].values)  # readings on a fixed schedule, not drifting
    assert np.all(np.abs(spacing - 1.0) < 0.3), spacing


def test_settings_are_restored_from_a_snapshot(fleet_factory, smartmeters, engine) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    results = []

    @bpp.stage_decorator(meters)
    def change_and_restore():
        snapshot = yield from stubs.snapshot_settings(meters)
        yield from bps.mv(meters[0].sampling_rate, 1000, meters[0].log_level, "DEBUG")
        changed = {"rate": meters[0].sampling_rate.get(), "level": meters[0].log_level.get()}
        written = yield from stubs.restore_settings(meters, snapshot)
        results.append((snapshot, changed, written))

    engine.RE(change_and_restore())
    ((snapshot, changed, written),) = results
    assert changed == {"rate": 1000, "level": "DEBUG"}
    assert sorted(written["m1"]) == ["log_level", "sampling_rate"] and written["m2"] == []
    assert meters[0].sampling_rate.get() == snapshot["m1"]["sampling_rate"]
    assert meters[0].log_level.get() == snapshot["m1"]["log_level"] == "INFO"


def test_fly_meters_flies_meters_as_prepared_one_stream_each(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    (uid,) = engine.RE(plans.fly_meters(meters, {"rate": 2000, "duration_s": 0.5}))
    run = embedded_catalog.client[uid]
    names = {d["name"] for d in engine.docs("descriptor")}
    assert names == {"m1", "m1_gaps", "m1_timing", "m2", "m2_gaps", "m2_timing", "meter_summary",
                     "alignment"}
    assert not engine.commands("trigger")  # no NTP gate
    assert_all_recorded(run, meters)
