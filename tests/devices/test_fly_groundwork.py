"""The device API the plans stand on, over real sockets against the emulator (issue 7).

Arming ``prepare``, releasing ``kickoff``, paused starts released together, slots,
reqSamples, abort safety, leftovers between runs, and the fly defects found by trying
faults as a user would.  Ground truth comes from the emulator (``EmulatorFleet``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import databroker
import h5py
import numpy as np
import pytest
from bluesky.utils import FailedPause, Msg, RunEngineInterrupted, short_uid

from smartmeter_ophyd.client import (
    MeterBusyError,
    MeterClient,
    MeterCommandError,
    MeterCommandRejected,
    MeterIdentityError,
)
from smartmeter_ophyd.devices import FlyConfig, SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.storage import close_client, make_tiled_writer
from tests.run_engines import RunEngine

RATE = 8000
FAST_RATE = 32000  # the ring buffer fills fastest (§4.10)


@pytest.fixture
def fleet() -> Iterator[EmulatorFleet]:
    with EmulatorFleet(3, name_prefix="gw") as emulated:
        yield emulated


@pytest.fixture
def make_meter(tmp_path: Path):
    made: list[SmartMeter] = []

    def make(port: int, name: str, **kwargs: Any) -> SmartMeter:
        kwargs.setdefault("data_directory", tmp_path / "hdf5")
        kwargs.setdefault("timeout", 2.0)
        meter = SmartMeter("127.0.0.1", port, name=name, **kwargs)
        meter.connect()
        made.append(meter)
        return meter

    yield make
    for meter in made:
        meter.destroy()


def meters_of(fleet: EmulatorFleet, make_meter, count: int, **kwargs: Any) -> list[SmartMeter]:
    return [make_meter(fleet.ports[i], fleet.names[i], **kwargs) for i in range(count)]


def recorded(meter: SmartMeter) -> np.ndarray:
    with h5py.File(meter.hdf5_path, "r") as f:
        return np.stack([f[ch][()] for ch in ("v_l1", "i_l1", "v_l2", "i_l2", "v_l3", "i_l3")],
                        axis=1)


def assert_every_sample_from_the_first(meter: SmartMeter, fleet: EmulatorFleet, i: int) -> None:
    """Recorded bit for bit from the meter's first sample, nothing missing."""
    truth = fleet.truth(i)
    summary = meter.last_summary
    assert summary is not None and summary.explained, summary
    assert summary.missing_declared == 0
    values = recorded(meter)
    assert len(values) == truth.sent_samples
    assert np.array_equal(values.view(np.uint32), truth.values[: len(values)].view(np.uint32))


def fly(meters: Sequence[SmartMeter], config: FlyConfig | None = None,
        flush_period: float = 0.25, live: bool = False) -> Generator[Msg, Any, str]:
    """A minimal multi-meter fly: one stream per meter, collected after a failure too."""
    if config is not None:
        for meter in meters:
            yield from bps.prepare(meter, config, wait=True)
    uid: str = yield from bps.open_run()
    for meter in meters:
        yield from bps.declare_stream(meter, name=meter.name, collect=True)
    yield from bps.kickoff_all(*meters, wait=True)
    group = short_uid("complete")
    yield from bps.complete_all(*meters, group=group, wait=False)
    failure: BaseException | None = None
    done = False
    while not done:
        # A meter's failure arrives at whichever message follows it: after a wait timed out,
        # bluesky still throws the failed status into the plan, at a collect or a read.
        try:
            done = yield from bps.wait(group=group, timeout=flush_period, error_on_timeout=False)
            for meter in meters:
                yield from bps.collect(meter, name=meter.name, return_payload=False)
            if live:
                yield from bps.trigger_and_read([m.live_stream for m in meters], name="primary")
        except Exception as exc:  # a meter failed: stop the others, collect what all recorded
            failure = exc
            done = True
    if failure is not None:
        for meter in meters:
            yield Msg("stop", meter)
        while not all(m.complete().done for m in meters):
            try:
                yield from bps.sleep(0.05)
            except Exception:  # another meter's failure, reported with the first below
                pass
        for meter in meters:
            yield from bps.collect(meter, name=meter.name, return_payload=False)
        errors = [m.complete().exception() for m in meters]
        raise next((e for e in errors if e is not None), failure)
    yield from bps.close_run()
    return uid


def engine_with_catalog(catalog) -> tuple[RunEngine, list[tuple[str, dict[str, Any]]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    engine.subscribe(make_tiled_writer(catalog.client))
    return engine, docs


def meter_idle(fleet: EmulatorFleet, i: int) -> bool:
    return not fleet.call(lambda: fleet.meter(i).sampling)


# ------------------------------------------------------------------ arming prepare


def test_prepare_arms_a_scheduled_start_and_kickoff_waits_for_it(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    start_time = int(time.time()) + 2
    status = meter.prepare(FlyConfig(rate=RATE, n_samples=RATE // 2, start_time=start_time))
    status.wait(5)
    reply = meter.last_sample_reply
    assert reply is not None and reply.raw_fields["startTs"] == f"{start_time}.000"
    assert meter_idle(fleet, 0)  # accepted, counting down (§6.4): not sampling yet
    kicked = meter.kickoff()
    kicked.wait(start_time - time.time() + 5)
    assert time.time() >= start_time - 0.05  # done at the meter's start, not at the reply
    meter.complete().wait(10)
    truth = fleet.truth(0)
    assert meter.last_summary.start_ts == pytest.approx(truth.meter_start_ts, abs=1e-3)
    assert_every_sample_from_the_first(meter, fleet, 0)


def test_prepare_refuses_a_start_outside_the_window_before_sending(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    for start_time in (1, int(time.time()) - 5, int(time.time()) + 60):
        with pytest.raises(MeterCommandError, match=r"gw1 .*start_time"):
            meter.prepare({"rate": RATE, "start_time": start_time})
    assert fleet.call(fleet.meter(0).truth) is None  # no sample ever reached it


def test_prepare_fails_with_the_meters_own_window_message() -> None:
    # The meter syncs to a server 5 s behind before checking the window (§6.4): a start the
    # host clock puts 17 s ahead is 22 s ahead for the meter, which refuses it.
    with EmulatorFleet([{"time_server_offset_s": -5.0}], name_prefix="late") as fleet:
        meter = SmartMeter("127.0.0.1", fleet.ports[0], name="late1",
                           data_directory=Path("/tmp") / f"late-{time.time_ns()}", timeout=2.0)
        try:
            meter.connect()
            status = meter.prepare({"rate": RATE, "start_time": int(time.time()) + 17})
            with pytest.raises(MeterCommandRejected, match="Cannot start sampling in"):
                status.wait(5)
            assert not meter.flying and meter_idle(fleet, 0)
        finally:
            meter.destroy()


def test_prepare_on_a_busy_meter_fails_busy(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    with MeterClient("127.0.0.1", fleet.ports[0], timeout=2.0) as other:
        session = other.sample(rate=1000)
        try:
            status = meter.prepare({"rate": RATE, "start_time": int(time.time()) + 3})
            with pytest.raises(MeterBusyError):
                status.wait(5)
        finally:
            session.stop()


# ------------------------------------------------------------------ flow control


def test_cts_paused_start_released_together_by_the_plan(fleet, make_meter) -> None:
    meters = meters_of(fleet, make_meter, 3)
    config = FlyConfig(rate=RATE, flow_control="cts", release="plan", n_samples=RATE)
    for status in [m.prepare(config) for m in meters]:
        status.wait(5)
    time.sleep(0.5)  # §5.1: paused meters sample into their buffers and send nothing
    assert [m.samples_received for m in meters] == [0, 0, 0]
    assert all(fleet.call(lambda i=i: fleet.meter(i).sampling) for i in range(3))
    for status in [m.kickoff() for m in meters]:
        status.wait(5)
    for meter in meters:
        meter.complete().wait(20)
    for i, meter in enumerate(meters):
        assert_every_sample_from_the_first(meter, fleet, i)
        assert meter_idle(fleet, i)


def test_slot_fly_sends_in_its_seconds_and_loses_nothing(fleet, make_meter) -> None:
    meters = meters_of(fleet, make_meter, 2)
    for i, meter in enumerate(meters):
        meter.prepare(FlyConfig(rate=1000, slot=(i, 2), n_samples=3000)).wait(5)
    for status in [m.kickoff() for m in meters]:
        status.wait(10)
    for meter in meters:
        meter.complete().wait(20)
    for i, meter in enumerate(meters):
        assert_every_sample_from_the_first(meter, fleet, i)
        assert fleet.call(lambda i=i: fleet.meter(i).boot_count) == 1  # no overflow reboot


def test_reqsamples_fly_pulls_within_the_send_buffer(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    meter.prepare(FlyConfig(rate=1000, flow_control="reqSamples", request_size=42,
                            n_samples=2000)).wait(5)
    meter.kickoff().wait(10)
    meter.complete().wait(20)
    assert_every_sample_from_the_first(meter, fleet, 0)
    assert fleet.call(lambda: fleet.meter(0).boot_count) == 1
    with pytest.raises(MeterCommandError, match=r"request_size=43 .*11\.\.42"):
        meter.prepare({"rate": 1000, "flow_control": "reqSamples", "request_size": 43})
    assert not fleet.truth(0).active  # the refused request never reached the meter


def test_a_fly_stops_as_its_target_arrives_not_a_read_batch_later(fleet, make_meter) -> None:
    """A full-rate fly's reads are batched (one wake-up per ~0.25 s); over the last batches
    before its target they are not, so the stop goes out as the target arrives and the
    meter samples on for milliseconds past it, not for up to a batch."""
    (meter,) = meters_of(fleet, make_meter, 1)
    meter.prepare(FlyConfig(rate=RATE, n_samples=3 * RATE)).wait(5)
    meter.kickoff().wait(10)
    meter.complete().wait(20)
    assert meter.client.async_client.batch_raises >= 1  # batched while it streamed
    assert meter.last_stop_reason == f"{3 * RATE} samples reached"
    assert_every_sample_from_the_first(meter, fleet, 0)
    beyond = fleet.truth(0).sent_samples - 3 * RATE
    assert 0 <= beyond < 0.1 * RATE, f"sampled {beyond / RATE:.3f} s past the target"


def test_a_fly_stops_as_its_target_arrives_while_its_writes_lag(
    fleet, make_meter, monkeypatch
) -> None:
    """The stop goes out as the target's samples arrive, even while the device is still
    writing what came before: here the I/O thread is held for 1.5 s by the first write (as
    on a busy host, behind other meters' writes), across the 1-s target."""
    from smartmeter_ophyd.devices import _controller

    write = _controller.FlyController._write
    held = threading.Event()

    def lagging_write(self, blocks):
        if not held.is_set():
            held.set()
            time.sleep(1.5)
        write(self, blocks)

    monkeypatch.setattr(_controller.FlyController, "_write", lagging_write)
    (meter,) = meters_of(fleet, make_meter, 1)
    meter.prepare(FlyConfig(rate=RATE, n_samples=RATE)).wait(5)
    meter.kickoff().wait(10)
    meter.complete().wait(20)
    assert held.is_set()
    assert meter.last_stop_reason == f"{RATE} samples reached"
    assert_every_sample_from_the_first(meter, fleet, 0)
    beyond = fleet.truth(0).sent_samples - RATE
    assert 0 <= beyond < 0.1 * RATE, f"sampled {beyond / RATE:.3f} s past the target"


# ------------------------------------------------------------------ runs, aborts, leftovers


def test_each_meter_is_its_own_stream_and_the_catalog_holds_every_sample(
    fleet, make_meter, embedded_catalog
) -> None:
    meters = meters_of(fleet, make_meter, 2, data_directory=embedded_catalog.data_directory)
    engine, _docs = engine_with_catalog(embedded_catalog)
    meters[0].prepare(FlyConfig(rate=RATE, n_samples=RATE))
    meters[1].prepare(FlyConfig(rate=4000, n_samples=6000))  # unequal counts and rates
    (uid,) = engine(fly(meters))
    client = databroker.from_profile(embedded_catalog.profile)
    try:
        run = client[uid]
        for meter in meters:
            assert run[meter.name][f"{meter.name}_v_l1"].shape[0] == meter.samples_received
    finally:
        close_client(client)
    # and nothing is left over: a count right after works
    (count_uid,) = engine(bp.count([meters[0]]))
    assert count_uid


def test_bluesky_fly_is_refused_before_any_meter_starts(fleet, make_meter) -> None:
    meters = meters_of(fleet, make_meter, 2)
    engine = RunEngine({})
    with pytest.raises(MeterCommandError, match="plans.synchronized_fly"):
        engine(bp.fly(meters))
    assert meter_idle(fleet, 0) and meter_idle(fleet, 1)


def test_abort_mid_fly_leaves_meters_idle_and_the_next_fly_starts(
    fleet, make_meter, embedded_catalog
) -> None:
    meters = meters_of(fleet, make_meter, 2, data_directory=embedded_catalog.data_directory)
    engine, docs = engine_with_catalog(embedded_catalog)
    config = FlyConfig(rate=RATE, duration_s=30)
    threading.Timer(1.5, engine.request_pause).start()
    with pytest.raises((RunEngineInterrupted, FailedPause)):
        engine(fly(meters, config))
    if engine.state == "paused":
        engine.abort("testing abort")
    (stop,) = [d for n, d in docs if n == "stop"]
    assert stop["exit_status"] == "abort"
    assert meter_idle(fleet, 0) and meter_idle(fleet, 1)
    for meter in meters:
        assert not meter.flying and meter.last_summary is not None
    # at once: a new fly of both meters
    (uid,) = engine(fly(meters, FlyConfig(rate=RATE, n_samples=RATE // 2)))
    assert all(m.last_summary.explained for m in meters)
    assert uid


def test_a_failed_fly_still_collects_everything_and_names_the_cause(
    fleet, make_meter, embedded_catalog
) -> None:
    meters = meters_of(fleet, make_meter, 2, data_directory=embedded_catalog.data_directory)
    engine, docs = engine_with_catalog(embedded_catalog)
    threading.Timer(1.0, lambda: fleet.inject(0, "drop_connections")).start()
    with pytest.raises(Exception, match="gw1"):
        engine(fly(meters, FlyConfig(rate=RATE, duration_s=4)))
    (stop,) = [d for n, d in docs if n == "stop"]
    assert stop["exit_status"] == "fail"
    assert "gw1" in stop["reason"] and "connection" in stop["reason"]
    client = databroker.from_profile(embedded_catalog.profile)
    try:
        run = client[stop["run_start"]]
        for meter in meters:
            with h5py.File(meter.hdf5_path, "r") as f:
                on_disk = f["v_l1"].shape[0]
            assert on_disk == meter.samples_received > 0
            assert run[meter.name][f"{meter.name}_v_l1"].shape[0] == on_disk
    finally:
        close_client(client)


# ------------------------------------------------------------------ defects, each a regression


def test_samples_after_a_silence_timeout_are_recorded(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1, timeout=1.0)
    meter.prepare({"rate": RATE, "duration_s": 3})
    meter.kickoff().wait(5)
    fleet.inject(0, "stall", seconds=6.0)
    status = meter.complete()
    try:
        status.wait(30)
    except Exception as exc:  # the silence may fail the fly; what matters is the data
        print(f"the fly failed: {exc}")
    summary = meter.last_summary
    assert summary is not None, "no summary after the stall"
    assert summary.explained, summary.notes
    assert recorded(meter).shape[0] == summary.received_samples == fleet.truth(0).sent_samples


def test_connect_refuses_another_meter_at_the_same_address(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    meter.close()
    with MeterClient("127.0.0.1", fleet.ports[0], timeout=2.0) as other:
        other.set_name("intruder")
    with pytest.raises(MeterIdentityError, match="intruder"):
        meter.connect()
    assert not meter.connected


def test_latched_measures_are_prepared_at_their_own_rate(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    meter.prepare({"rate": 50, "measures": "p,q", "duration_s": 1})
    assert meter.measures.get() == "p,p,p,q,q,q"
    meter.measures.put(meter.measures.get())  # its own value passes its validator
    meter.prepare(FlyConfig(rate=50, measures="v,i_RMS", n_samples=50))
    meter.kickoff().wait(5)
    meter.complete().wait(10)
    assert meter.last_summary.explained


def test_a_data_directory_the_catalog_cannot_read_is_refused(tmp_path, embedded_catalog) -> None:
    with pytest.raises(MeterCommandError, match="outside the catalog's readable storage"):
        SmartMeter("127.0.0.1", 1, name="m1", data_directory=tmp_path / "elsewhere",
                   readable_root=embedded_catalog.readable_storage)
    inside = SmartMeter("127.0.0.1", 1, name="m1", data_directory=embedded_catalog.data_directory,
                        readable_root=embedded_catalog.readable_storage)
    inside.destroy()


def test_link_state_follows_the_connection(fleet, make_meter) -> None:
    (meter,) = meters_of(fleet, make_meter, 1)
    assert meter.link_state.get() == "connected"
    seen: list[str] = []
    meter.link_state.subscribe(lambda value, **_: seen.append(value), run=False)
    fleet.inject(0, "drop_connections")
    deadline = time.monotonic() + 10
    while "connected" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[:1] == ["lost"] and "connected" in seen  # lost, then reconnected
    meter.close()
    assert meter.link_state.get() == "disconnected"


# ------------------------------------------------------------------ the timing stream


def test_timing_stream_matches_the_emulators_correction_history(make_meter) -> None:
    """Every §6.5 record the meter logged during the fly is in the timing stream, as the
    emulator made it; the corrections it announced are what it really did.  The second
    sync's lines are written inside data frames (§4.6) and still make their record."""
    with EmulatorFleet(1, name_prefix="tim") as fleet:
        meter = make_meter(fleet.ports[0], "tim1")
        meter.prepare(FlyConfig(rate=RATE, duration_s=5))
        meter.kickoff().wait(5)
        time.sleep(1.0)
        fleet.time_offset_s = 0.030  # the time server steps: the next sync is 30 ms off
        meter.ntp.trigger().wait(5)
        time.sleep(1.5)
        fleet.time_offset_s = 0.0
        fleet.inject(0, "log_in_frame", next_logs=8)  # every line of the next sync
        meter.ntp.trigger().wait(5)
        meter.complete().wait(20)
        truth = fleet.corrections(0)
    assert meter.last_summary.repaired_frames >= 5  # the lines really were inside frames
    records = [r for r in meter.timing_stream.records if r.during_sampling]
    assert len(records) == len(truth.sync_records) == 2
    for record, made in zip(records, truth.sync_records, strict=True):
        assert (record.goal_samples, record.total_samples) == (made.goal, made.total)
        assert record.offset_s == pytest.approx(made.offset_s, abs=5e-4)  # printed to 1 ms
        assert record.correction == made.queued
        assert not record.problems
    assert any(r.correction for r in records)  # 30 ms is past the 9 ms threshold (§6.5)
    applied = len(truth.duplicates) - len(truth.correction_drops)
    assert sum(r.correction for r in records) == applied + truth.pending


# ------------------------------------------------------------------ what a person sees


def test_hints_are_the_line_voltages_and_the_total_power(tmp_path) -> None:
    meter = SmartMeter("127.0.0.1", 1, name="m1", data_directory=tmp_path)
    assert meter.hints["fields"] == [
        "m1_voltage_l1", "m1_voltage_l2", "m1_voltage_l3", "m1_total_active_power",
    ]
    assert len(meter.describe()) == 25  # everything else is still read, as "normal"


def test_provenance_is_in_the_file_and_the_run_metadata(fleet, make_meter) -> None:
    from smartmeter_ophyd import __version__

    (meter,) = meters_of(fleet, make_meter, 1, emulated=True)
    meter.prepare(FlyConfig(rate=RATE, n_samples=RATE // 4))
    meter.kickoff().wait(5)
    meter.complete().wait(10)
    with h5py.File(meter.hdf5_path, "r") as f:
        assert f.attrs["emulated"] == "true" and f.attrs["package_version"] == __version__
        assert f.attrs["firmware"] == "2.2"
    md = meter.run_metadata()
    assert md["emulated"] is True and md["smartmeter_ophyd"] == __version__
    assert md["firmware"] == "2.2"


def test_live_stream_summarises_the_fly_and_best_effort_callback_shows_it(
    fleet, make_meter, capsys
) -> None:
    from bluesky.callbacks.best_effort import BestEffortCallback

    (meter,) = meters_of(fleet, make_meter, 1)
    engine = RunEngine({})
    bec = BestEffortCallback()
    bec.disable_plots()
    engine.subscribe(bec)
    engine(fly([meter], FlyConfig(rate=RATE, n_samples=3 * RATE), live=True))
    out = capsys.readouterr().out
    assert "gw1_live_p_total" in out and "gw1_live_frequency" in out  # the live table
    rows = meter.live_stream.windows
    assert len(rows) >= 3
    for row in rows[:3]:  # full windows: the grid's 230 V rms, 50 Hz (emulator/_grid.py)
        assert row["samples"] == RATE
        for line in ("l1", "l2", "l3"):
            assert row[f"v_{line}_rms"] == pytest.approx(230.0, rel=0.02)
        assert row["frequency"] == pytest.approx(50.0, abs=0.3)
        assert row["p_total"] == pytest.approx(row["p_l1"] + row["p_l2"] + row["p_l3"])
    assert rows[0]["time"] == pytest.approx(meter.last_summary.start_ts, abs=1e-6)


@pytest.mark.slow
def test_cts_survives_a_consumer_stalled_longer_than_the_ring_buffer(fleet, make_meter) -> None:
    """A 10 s stall of the writer at 32 kHz x 6 channels: the ring buffer (4.8 s of it,
    §4.10) would overflow and reboot the meter.  cts pauses the meter, resumes it before the buffer
    is half full, the host holds the rest: no reboot, every sample recorded."""
    (meter,) = meters_of(fleet, make_meter, 1)
    ring = fleet.call(lambda: fleet.meter(0).ring)
    fills: list[int] = []
    watching = threading.Event()

    def watch_ring() -> None:
        while not watching.is_set():
            fills.append(fleet.call(lambda: ring.readable))
            time.sleep(0.05)

    stalled: list[bool] = []

    def stalling_progress(**kwargs: Any) -> None:
        if kwargs.get("current", 0) > FAST_RATE and not stalled:  # once, a second in
            stalled.append(True)
            time.sleep(10.0)

    watcher = threading.Thread(target=watch_ring, daemon=True)
    watcher.start()
    try:
        meter.prepare(FlyConfig(rate=FAST_RATE, flow_control="cts", duration_s=13))
        meter.kickoff().wait(5)
        status = meter.complete()
        status.watch(stalling_progress)
        status.wait(90)
    finally:
        watching.set()
        watcher.join(5)
    assert stalled
    assert fleet.call(lambda: fleet.meter(0).boot_count) == 1  # no overflow reboot
    assert max(fills) <= 0.5 * ring.capacity, max(fills) / ring.capacity
    stats = meter.last_flow_stats
    assert stats is not None and stats.pauses >= 1 and stats.resumes_on_fill >= 1, stats
    assert_every_sample_from_the_first(meter, fleet, 0)
