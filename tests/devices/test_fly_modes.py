"""Fly modes of the SmartMeter flyer against the emulator: UDP, scheduled start, cts
back-pressure, and two meters sharing a scheduled start.

Ground truth is the emulator's (``truth()``: every row it produced, its clock offset at the
start, the start it reported) and, for flow control, its ring buffer read on its own loop.
Recordings are read back from the device's HDF5 file (and, for the scheduled start, through
the catalog too).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import databroker
import h5py
import numpy as np
import pytest

from plans import fly_meters
from smartmeter_ophyd.devices import CtsPolicy, FlyError, SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.protocol import RING_BUFFER_BYTES, Measures
from smartmeter_ophyd.storage import (
    close_client,
    make_tiled_writer,
    read_packets,
    read_stream,
    time_window,
)
from tests.devices.truth import meter_clock_and_truth
from tests.run_engines import RunEngine

RATE = 8000
NTP_OFFSETS = (-0.006, 0.006)
"""Per-meter time-server errors (s) of the two-meter test."""
CHANNELS = Measures.VI.channels


def recorded(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(samples (n, 6) float32, file attributes) of a device HDF5 file."""
    with h5py.File(path, "r") as f:
        values = np.stack([f[ch][()] for ch in CHANNELS], axis=1)
        attrs = dict(f.attrs)
        gaps = {k: f["gaps"][k][()] for k in f["gaps"]}
    attrs["gaps"] = gaps
    return values, attrs


def assert_matches_truth(meter: SmartMeter, truth: Any) -> np.ndarray:
    """Every sample the meter sent is recorded exactly once, bit for bit, in order.

    Frames are matched to the truth by packet number (a missing packet would be a gap row
    and its samples absent); returns the recorded values.
    """
    summary = meter.last_summary
    assert summary is not None and summary.explained, summary
    assert summary.device_sent_samples == truth.sent_samples
    values, attrs = recorded(meter.hdf5_path)
    assert values.dtype == np.float32
    packets = read_packets(meter.hdf5_path)
    chunk = int(meter.last_sample_reply.chunk_size) // Measures.VI.bytes_per_sample
    expected = np.concatenate([
        truth.values[p * chunk: p * chunk + n]
        for p, n in zip(packets["packet"], np.diff(np.append(packets["first_sample"], len(values))),
                        strict=True)
    ])
    assert np.array_equal(values.view(np.uint32), expected.view(np.uint32))
    assert len(values) + summary.missing_declared == truth.sent_samples
    assert len(attrs["gaps"]["sample_index"]) == summary.gaps + summary.corrupt_frames
    return values


@pytest.fixture
def make_meter(tmp_path: Path):
    made: list[SmartMeter] = []

    def make(port: int, name: str = "m1", **kwargs: Any) -> SmartMeter:
        meter = SmartMeter("127.0.0.1", port, name=name, data_directory=tmp_path / "hdf5",
                           timeout=2.0, **kwargs)
        made.append(meter)
        meter.connect()
        return meter

    yield make
    for meter in made:
        meter.destroy()


def test_udp_fly_records_every_datagram(emulated, make_meter) -> None:
    meter = make_meter(emulated.meters[0].command_port)
    meter.prepare({"rate": RATE, "transport": "UDP", "n_samples": RATE})
    meter.kickoff().wait(10)
    meter.complete().wait(20)
    summary = meter.last_summary
    assert summary.transport.value == "UDP" and summary.ended_by == "stop"
    assert meter.last_sample_reply.chunk_size == 504  # one ≤512-byte frame per datagram (§4.13)
    values = assert_matches_truth(meter, emulated.truth(0))
    assert len(values) >= RATE


def test_scheduled_start_fly_starts_on_the_meters_second(emulated, embedded_catalog) -> None:
    meter = SmartMeter("127.0.0.1", emulated.meters[0].command_port, name="m1",
                       data_directory=embedded_catalog.data_directory, timeout=2.0)
    engine = RunEngine({})
    engine.subscribe(make_tiled_writer(embedded_catalog.client))
    commands: list[tuple[str, float]] = []
    engine.msg_hook = lambda msg: commands.append((msg.command, time.time()))
    try:
        meter.connect()
        start_time = int(time.time()) + 2
        config = {"rate": RATE, "n_samples": RATE // 2, "start_time": start_time}
        (uid,) = engine(fly_meters([meter], config))
    finally:
        meter.destroy()
    # kickoff is done at the first sample, which the meter takes at its start_time (§6.4):
    # the plan moves on to "complete" only then
    completed_at = next(t for command, t in commands if command == "complete")
    assert completed_at >= start_time - 0.05
    truth = emulated.truth(0)
    summary = meter.last_summary
    # §6.4: the firmware starts ≈ 1 ms before the requested second and says so at stop
    assert truth.reported_start_ts == f"{summary.start_ts:.3f}"
    assert abs(truth.meter_start_ts - summary.start_ts) < 0.001
    assert start_time - 0.002 <= summary.start_ts < start_time
    assert meter.last_sample_reply.start_ts == start_time
    values, attrs = recorded(meter.hdf5_path)
    assert_matches_truth(meter, truth)
    # the time axis starts at the meter's real start, not at the reply's "<time>.000"
    assert attrs["start_ts_reply"] == start_time
    assert attrs["start_ts"] == summary.start_ts
    assert attrs["start_ts_source"] == "stop reply start_ts"
    # the stored axis is the time model's, standing on the meter's own records (1 ms
    # resolution, §6.1): within 1 ms of the meter's clock at each sample's true instant ...
    with h5py.File(meter.hdf5_path, "r") as f:
        file_times = f["time"][()]
        assert f.attrs["time_source"] == "time model"
    meter_clock, true_times, clock_bound_s = meter_clock_and_truth(emulated, 0, len(values))
    assert np.max(np.abs(file_times - meter_clock)) <= 1.2e-3
    # ... and within the start's sync of the truth: the meter's clock is only as true as its
    # last sync, which on a busy host can leave it more than 1 ms off
    assert np.max(np.abs(file_times - true_times)) <= clock_bound_s + 1.2e-3
    assert file_times[0] == summary.start_ts
    expected = file_times

    # ... and the catalog serves the same corrected times (it reads the HDF5 file)
    client = databroker.from_profile(embedded_catalog.profile)
    try:
        run = client[uid]
        ds = read_stream(run, "m1", prefix="m1")
        np.testing.assert_allclose(ds["time"].values, expected, rtol=0, atol=1e-6)
        first_ms = time_window(run, summary.start_ts - 1.0, summary.start_ts + 0.001,
                               "m1", prefix="m1")
        assert first_ms.attrs["first_index"] == 0
        assert first_ms.sizes["time"] == RATE // 1000  # the 8 samples of the first millisecond
        assert abs(first_ms["time"].values[0] - summary.start_ts) < 1e-6
    finally:
        close_client(client)


@pytest.mark.parametrize(
    "max_fill, way_out, stall_s",
    [
        # the consumer catches up long before the meter fills; the stall outlasts the time the
        # host needs to see its backlog (batched reads come every 0.25 s) and pause the meter
        (0.25, "backlog", 0.8),
        (0.01, "fill", 0.8),  # the consumer is still stuck when the meter holds 1 %: resume anyway
    ],
)
def test_cts_back_pressure_pauses_and_resumes_without_loss(
    emulated, make_meter, max_fill: float, way_out: str, stall_s: float
) -> None:
    policy = CtsPolicy(pause_backlog_s=0.25, resume_backlog_s=0.05, max_fill=max_fill, poll_s=0.01)
    meter = make_meter(emulated.meters[0].command_port, cts_policy=policy)
    emulator = emulated.meters[0]
    fills: list[int] = []
    watching = threading.Event()

    def watch_ring() -> None:  # ground truth: the emulated meter's ring buffer, on its loop
        while not watching.is_set():
            fills.append(emulated.call(lambda: emulator.ring.readable))
            time.sleep(0.01)

    stalls = [stall_s] * 4  # the writer stalls on each of its first progress reports, then keeps up

    def slow_progress_bar(**kwargs: Any) -> None:
        if stalls:
            time.sleep(stalls.pop())

    watcher = threading.Thread(target=watch_ring, daemon=True)
    watcher.start()
    try:
        meter.prepare({"rate": RATE, "flow_control": "cts", "n_samples": 2 * RATE})
        meter.kickoff().wait(10)
        status = meter.complete()
        status.watch(slow_progress_bar)
        status.wait(30)
    finally:
        watching.set()
        watcher.join(10)
    stats = meter.last_flow_stats
    assert stats is not None and stats.pauses >= 1, stats
    real_max = max(fills) / RING_BUFFER_BYTES
    assert real_max <= 2 * policy.max_fill <= 0.5  # never near the overflow reboot (§4.10)
    if way_out == "backlog":
        assert stats.resumes_on_backlog >= 1 and stats.resumes_on_fill == 0, stats
        assert real_max * RING_BUFFER_BYTES > 0.1 * RATE * Measures.VI.bytes_per_sample
    else:
        assert stats.resumes_on_fill >= 1, stats
        assert policy.max_fill <= stats.max_fill <= 2 * policy.max_fill
        assert real_max > 0.5 * policy.max_fill  # the meter really held data back while paused
    assert meter.last_summary.ended_by == "stop"
    assert_matches_truth(meter, emulated.truth(0))  # paused and resumed: nothing lost
    assert meter.last_summary.missing_declared == 0


def test_cts_policy_refuses_unsafe_fill() -> None:
    with pytest.raises(ValueError, match="overflow"):
        CtsPolicy(max_fill=0.6)
    with pytest.raises(ValueError, match="below"):
        CtsPolicy(pause_backlog_s=1.0, resume_backlog_s=1.0)


def test_two_meters_share_a_scheduled_start_and_line_up(tmp_path, make_meter) -> None:
    # Each meter syncs to its own time server, off by a known amount (§6.2): after the NTP
    # sync before the scheduled start (§6.4) their clocks differ by about 12 ms = 96 samples,
    # give or take the syncs' own errors (a few ms on a loaded host).
    with EmulatorFleet([{"time_server_offset_s": o} for o in NTP_OFFSETS], name_prefix="sync") as emulated:
        meters = [make_meter(m.command_port, name=m.name) for m in emulated.meters]
        start_time = int(time.time()) + 2
        armed = [
            meter.prepare({"rate": RATE, "n_samples": RATE, "start_time": start_time})
            for meter in meters
        ]
        for status in armed:  # prepare arms a scheduled start: the meter accepted it
            status.wait(5)
        assert [m.last_sample_reply.start_ts for m in meters] == [start_time] * 2
        kicked = [meter.kickoff() for meter in meters]
        for status in kicked:
            status.wait(start_time - time.time() + 10)
        for meter in meters:
            meter.complete().wait(20)
        truths = [emulated.truth(i) for i in range(2)]
        confidences = [emulated.ntp_history(i)[-1].confidence_ms * 1e-3 for i in range(2)]
        first_true = [emulated.call(emulated.meters[i].session_truth).true_times[0]
                      for i in range(2)]
    summaries = [m.last_summary for m in meters]
    assert summaries[0].start_ts == summaries[1].start_ts  # same scheduled second
    assert abs(summaries[0].start_ts - start_time) <= 0.002
    recordings = [assert_matches_truth(m, t) for m, t in zip(meters, truths, strict=True)]
    for truth, configured, confidence in zip(truths, NTP_OFFSETS, confidences, strict=True):
        # the NTP setup did what we meant, within the sync's own confidence (§6.2)
        assert abs(truth.clock_offset_s - configured) <= confidence + 0.001

    # x_b[n] = x_a[n + L] with L = (offset_a - offset_b) * rate.  The same true instant is L
    # samples apart: L from where each meter really took its first sample.
    expected = (first_true[1] - first_true[0]) * RATE
    assert abs(expected) > 8  # a real offset of more than a millisecond, not a trivial zero
    # Find L by cross-correlation, over lags within half a 50 Hz cycle of the truth's L: the
    # periodic waveform makes lags a whole cycle apart indistinguishable (a whole cycle off
    # would fail assert_matches_truth above).
    v_a = recordings[0][:RATE, 0].astype(np.float64)
    v_b = recordings[1][:RATE, 0].astype(np.float64)
    half_period = RATE // 50 // 2
    lags = round(expected) + np.arange(-half_period + 1, half_period)
    margin = int(np.abs(lags).max())
    core = slice(margin, RATE - margin)
    score = np.array([np.dot(v_b[core], v_a[core.start + lag: core.stop + lag]) for lag in lags])
    best = int(np.argmax(score))
    y0, y1, y2 = score[best - 1: best + 2]
    measured = lags[best] + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)  # parabolic refinement
    assert abs(measured - expected) < 1.0, (measured, expected)


def test_stop_by_another_connection_fails_the_fly_naming_it(emulated, make_meter) -> None:
    """The symptom "no stop reply (stopped elsewhere)": the meter went idle (lifeness, §2.6)
    because another connection sent stop (§4.8).  Everything sent is still recorded."""
    meter = make_meter(emulated.meters[0].command_port)
    meter.prepare({"rate": RATE, "duration_s": 30})
    meter.kickoff().wait(10)
    with (socket.create_connection(("127.0.0.1", emulated.meters[0].command_port), 5) as other,
          other.makefile("rb") as stream):
        other.settimeout(5)
        assert b'"type":"smartmeter"' in stream.readline()  # the info line: we are in (§2.5)
        time.sleep(0.3)  # the meter tells the device about us (§2.1)
        other.sendall(b'{"cmd":"stop"}\n')
        foreign = b""
        while b'"cmd":"stop"' not in foreign:
            foreign = stream.readline()
        foreign_port = other.getsockname()[1]
    with pytest.raises(FlyError, match=f"another connection sent stop.*127.0.0.1:{foreign_port}"):
        meter.complete().wait(20)
    summary = meter.last_summary
    assert summary.ended_by == "stopped elsewhere" and not summary.explained
    sent = json.loads(foreign[len(b"Info:"):])["sent_samples"]
    values, _ = recorded(meter.hdf5_path)
    assert len(values) == summary.received_samples == sent  # tail included, nothing lost
    truth = emulated.truth(0)
    assert np.array_equal(values.view(np.uint32), truth.values[:sent].view(np.uint32))
