"""The emulator's timing is honest: what it reports is measured the way the firmware measures
it, and its ground truth says where every delivered sample really came from.

Each test drives a meter over real sockets and checks the wire against the ground truth
(``EmulatedMeter.session_truth()``, ``ntp_history``) and against the grid model, which is a
pure function of true time: a row's values can only match the grid at the instant the row was
really sampled.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.emulator import EmulatedMeter
from smartmeter_ophyd.emulator._sampling import KIND_DUPLICATE, KIND_FILLER, KIND_SAMPLE
from smartmeter_ophyd.protocol import NTP_UNIX_EPOCH_DELTA, decimation

from .conftest import MeterFactory, NtpServer
from .emulator_wire import Frame, RawClient, open_client
from .test_conformance_sampling import collect, stop_and_drain

RTC_FIRST_EDGE_S = 0.5
"""DS3231: the 1 Hz output goes high 500 ms after the seconds register is written; the
firmware writes it when sampling starts and counts seconds on the rising edges (§4.10)."""


def log_texts(lines: list[bytes]) -> list[str]:
    return [x.split(b": ", 1)[1].decode() for x in lines if x.startswith(b"Info:[")]


async def read_until_reply(client: RawClient, cmd: str) -> tuple[list[Frame], list[str], dict]:  # type: ignore[type-arg]
    """Frames and log texts up to the reply to ``cmd``."""
    import json

    frames: list[Frame] = []
    texts: list[str] = []
    while True:
        item = await client.read_item(timeout=5.0)
        if isinstance(item, Frame):
            frames.append(item)
        elif item.startswith(b"Info:{"):
            reply = json.loads(item[5:])
            if reply.get("cmd") == cmd:
                return frames, texts, reply
        elif item.startswith(b"Info:["):
            texts.extend(log_texts([item]))


def received(frames: list[Frame], channels: int) -> np.ndarray:
    return np.concatenate([f.samples(channels) for f in frames])


# --------------------------------------------------------------------------- §6.5 record


async def test_sync_record_counts_the_samples_taken_during_the_exchange(
    make_meter: MeterFactory,
) -> None:
    """§6.5: ``is <total> samples`` is read when the sync has completed, not before the
    exchange: with an 80 ms round trip at 8 kHz the stale count was 640 samples short and
    the record claimed an offset of +0.08 s on a meter whose sample count was right."""
    meter = await make_meter(network_delay_s=0.04)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000}})
    await collect(c, 0.6)
    await c.send({"cmd": "ntp"})
    _, texts, reply = await read_until_reply(c, "ntp")
    assert reply["msg"] == "Time synced"
    await stop_and_drain(c)
    await c.close()

    should = next(m for t in texts if (m := re.fullmatch(r"Should be: (\d+), is (\d+) samples", t)))
    offset = next(m for t in texts if (m := re.match(r"Offset of (-?\d+\.\d{3}) s", t)))
    goal, total = int(should.group(1)), int(should.group(2))
    sync = meter.ntp_history[-1]
    assert sync.rtt_s >= 0.08
    truth = meter.session_truth()
    assert truth is not None
    counted = truth.kinds != KIND_FILLER  # the firmware's totalSamples (§4.8)
    taken = int(np.count_nonzero(truth.true_times[counted] <= sync.true_time))
    assert abs(total - taken) <= 8  # the record is written right after the sync (<= 1 ms)
    # The meter's sample count agrees with its clock, which this sync moved by the change in
    # its error since the boot sync (a few ms on a loaded host): the offset is that move.
    moved = abs(sync.error_s - meter.ntp_history[0].error_s)
    assert abs(goal - total) / 8000 <= moved + 0.002
    assert abs(float(offset.group(1))) <= moved + 0.002


# -------------------------------------------------------------------- §4.7 per-second log


async def test_rate_log_is_measured_on_the_meters_own_clock(make_meter: MeterFactory) -> None:
    """§4.7: the firmware times every ``rate`` samples with its own ``micros()``.  With the
    ESP clock 2000 ppm fast the log must read the true rate / 1.002, never the true rate."""
    meter = await make_meter(drift_ppm=2000.0)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000, "measures": "v,i"}})
    _, lines = await collect(c, 2.4)
    await stop_and_drain(c)
    await c.close()
    logged = [float(m.group(1)) for t in log_texts(lines)
              if (m := re.fullmatch(r"(\d+\.\d\d)Hz, \d+s", t))]
    assert len(logged) >= 2
    truth = meter.session_truth()
    assert truth is not None
    t = truth.true_times[truth.kinds == KIND_SAMPLE]
    true_rate = (t.shape[0] - 1) / (t[-1] - t[0])
    on_meter_clock = true_rate / meter.clock.rate
    assert meter.clock.rate == pytest.approx(1.002)
    for rate in logged[1:]:
        assert rate == pytest.approx(on_meter_clock, abs=0.02)
    # The first interval runs from the start to the 8000th sample (sample 0 is at the start).
    first = 8000 / ((t[7999] - truth.true_start) * meter.clock.rate)
    assert logged[0] == pytest.approx(first, abs=0.02)


# ---------------------------------------------------------------- bursty rates (§4.3)


def _firmware_instants(rate: int, until: float) -> np.ndarray:
    """Seconds after the start at which firmware 2.2 keeps samples (ADE and RTC exact): the
    kept lattice, at most ``rate`` per RTC second; the counter starts with the session and
    restarts at each RTC second, 0.5 s, 1.5 s, ... after it (the RTC is reset at the start)."""
    dec = decimation(rate)
    step = dec.keep_every / dec.internal_rate
    bounds = [0.0, *np.arange(RTC_FIRST_EDGE_S, until + 1.0, 1.0)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        q = np.arange(np.ceil(lo / step - 1e-6), np.ceil(hi / step - 1e-6))
        out.append(q[:rate] * step)
    return np.concatenate(out)


def _check_bursts(meter: EmulatedMeter, data: np.ndarray, rate: int) -> None:
    truth = meter.session_truth()
    assert truth is not None
    np.testing.assert_array_equal(data, truth.values)
    sampled = truth.kinds == KIND_SAMPLE
    assert np.all(sampled)  # ADE and RTC agree: no fillers, no corrections
    t = truth.true_times
    # Each row was really sampled at its true instant: the grid there gives its values.
    expected = meter.grid.interleaved(t, meter.config.circuit)
    assert np.all(np.abs(data[:, 0::2] - expected[:, 0::2]) < 0.5)  # V
    # ... and those instants are where the firmware samples (bursts, §4.3).
    u = t - truth.true_start
    reference = _firmware_instants(rate, u[-1])
    assert u.shape[0] > rate and u[-1] > 1.5  # at least two RTC seconds began
    np.testing.assert_allclose(u, reference[: u.shape[0]], rtol=0, atol=2e-6)
    assert np.allclose(truth.rtc_edges - truth.true_start,
                       RTC_FIRST_EDGE_S + np.arange(truth.rtc_edges.shape[0]), atol=1e-6)


async def _sample(meter: EmulatedMeter, payload: dict[str, Any], seconds: float) -> np.ndarray:
    c = await open_client(meter.command_port)
    reply = await c.command({"cmd": "sample", "payload": payload})
    assert reply["error"] is False, reply
    if "time" in payload:
        await asyncio.sleep(max(0.0, payload["time"] - time.time()))
    frames, _ = await collect(c, seconds)
    tail, _ = await stop_and_drain(c)
    await c.close()
    return received(frames + tail, 6)


async def test_bursts_start_with_the_session_and_at_rtc_seconds(make_meter: MeterFactory) -> None:
    """§4.3: rates 10 and 1280 arrive as bursts of ``rate`` samples; immediate start."""
    meters = [await make_meter(), await make_meter()]
    data = await asyncio.gather(*(
        _sample(m, {"type": "TCP", "rate": rate}, 1.75) for m, rate in zip(meters, (10, 1280), strict=True)
    ))
    for meter, rate, rows in zip(meters, (10, 1280), data, strict=True):
        _check_bursts(meter, rows, rate)


async def test_bursts_of_a_scheduled_start(make_meter: MeterFactory) -> None:
    """§4.3, §6.4: the same for a scheduled start (which begins ~1 ms before the second)."""
    meters = [await make_meter(), await make_meter()]
    at = int(time.time()) + 2
    data = await asyncio.gather(*(
        _sample(m, {"type": "TCP", "rate": rate, "time": at}, 1.75)
        for m, rate in zip(meters, (10, 1280), strict=True)
    ))
    for meter, rate, rows in zip(meters, (10, 1280), data, strict=True):
        truth = meter.session_truth()
        assert truth is not None
        # ~1 ms early; the countdown was armed with a millisecond-rounded clock (§6.4)
        assert truth.meter_start_ts == pytest.approx(at - 0.001, abs=0.0005)
        _check_bursts(meter, rows, rate)


# --------------------------------------------------------------- scheduled start (§6.4)


class _FractionServer(asyncio.DatagramProtocol):
    """SNTP server that answers with the current second and a fixed fraction."""

    def __init__(self) -> None:
        self.fraction: float | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.sent: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        now = time.time()
        if self.fraction is not None:
            now = int(now) + self.fraction
        self.sent.append(now)
        ntp = now + NTP_UNIX_EPOCH_DELTA
        secs, frac = int(ntp), int((ntp - int(ntp)) * 2**32)
        reply = bytearray(48)
        reply[0], reply[1] = 0x24, 1
        reply[24:32] = data[40:48]
        struct.pack_into("!IIIIII", reply, 24, 0, 0, secs, frac, secs, frac)
        self.transport.sendto(bytes(reply), addr)


async def test_scheduled_start_window_carries_the_millisecond(make_meter: MeterFactory) -> None:
    """§6.4: ``delta_ms = (time - now_s)*1000 - now_ms``.  Right after a sync that leaves the
    clock at x.9996 s, now_ms rounded to 1000 and wrapped to 0 without a carry: +1 s."""
    loop = asyncio.get_running_loop()
    server = _FractionServer()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    try:
        meter = await make_meter(ntp_port=transport.get_extra_info("sockname")[1],
                                 network_delay_s=0.0)
        c = await open_client(meter.command_port)
        server.fraction = 0.9996
        synced_second = int(time.time()) + 1  # the server's second after the 0-199 ms wait
        at = synced_second + 3
        reply = await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100,
                                                              "time": at}}, timeout=3.0)
        await c.close()
    finally:
        transport.close()
    served = server.sent[-1]
    sync = meter.ntp_history[-1]
    assert sync.server_time == pytest.approx(served, abs=1e-6)
    # Ground truth: the meter clock read served + rtt/2 (+ a few us) when it checked.
    meter_now = served + sync.rtt_s / 2
    expected = (at - meter_now) * 1000
    delta = int(re.search(r"sampling in: (\d+)ms", reply["msg"]).group(1))  # type: ignore[union-attr]
    assert abs(delta - expected) <= 1.0, (delta, expected)
    assert reply["error"] is False and reply["startTs"] == f"{at}.000"


# ------------------------------------------------------------- two clocks (§4.10)


async def test_slow_ade_gets_rtc_fillers_of_l1_data(make_meter: MeterFactory) -> None:
    """§4.10: the ADE 400 ppm slow against the RTC delivers 7996.8 samples per RTC second;
    the RTC interrupt appends 3 or 4 copies of the last sample's L1 values (here in v,i_L2
    mode), flagged as fillers in the truth and not counted in ``samples``."""
    meter = await make_meter(ade_drift_ppm=-400.0, rtc_drift_ppm=1.5)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000,
                                                  "measures": "v,i_L2"}})
    frames, lines = await collect(c, 2.7)
    tail, stop = await stop_and_drain(c)
    await c.close()
    data = received(frames + tail, 2)
    truth = meter.session_truth()
    assert truth is not None
    np.testing.assert_array_equal(data, truth.values)
    # §4.7: the firmware reports each short second (after the first) as an ERROR.
    missed = [int(m.group(1)) for x in lines
              if (m := re.fullmatch(rb"Info:\[E\][^:]+:\d\d:\d\d: MISSED (\d+) SAMPLES", x))]
    assert missed and missed == (8000 - truth.rtc_counts[1:1 + len(missed)]).tolist()
    fillers = truth.filler_indices
    assert fillers.shape[0] >= 6  # two full RTC seconds, 3-4 fillers each
    assert stop["samples"] == data.shape[0] - fillers.shape[0]
    assert stop["sent_samples"] == data.shape[0]
    edges = truth.rtc_edges
    assert np.allclose(np.diff(edges), 1 / (1 + 1.5e-6), atol=1e-9)
    assert edges[0] == pytest.approx(truth.true_start + 0.5 / (1 + 1.5e-6), abs=1e-6)
    ade_step = 1 / 8000 / (1 - 400e-6)
    sampled = truth.kinds == KIND_SAMPLE
    t = truth.true_times
    assert np.allclose(np.diff(t[sampled]), ade_step, atol=5e-7)  # no sample lost
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_second = (t >= lo) & (t < hi)
        n_sampled = int(np.count_nonzero(in_second & sampled))
        assert n_sampled in (7996, 7997)
        filled = np.flatnonzero((truth.kinds == KIND_FILLER) & (t == hi))
        assert filled.shape[0] == 8000 - n_sampled  # appended at the interrupt closing it
        last = filled[0] - 1
        l1 = meter.grid.interleaved(t[last:last + 1], meter.config.circuit)[0, 0:2]
        for f in filled:
            assert np.allclose(data[f], l1, atol=[0.5, 15])  # L1 values (§4.10) ...
            assert not np.allclose(data[f], data[last], atol=1.0)  # ... not the L2 row


async def test_fast_ade_loses_the_excess_at_each_rtc_second(make_meter: MeterFactory) -> None:
    """§4.10: the ADE 400 ppm fast delivers 8003.2 samples per RTC second; the per-second
    counter refuses the excess, so every full RTC second holds exactly 8000 samples and the
    truth lists the refused instants (at the end of each second)."""
    meter = await make_meter(ade_drift_ppm=400.0)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 8000, "measures": "v,i"}})
    frames, _ = await collect(c, 2.7)
    tail, stop = await stop_and_drain(c)
    await c.close()
    data = received(frames + tail, 2)
    truth = meter.session_truth()
    assert truth is not None
    np.testing.assert_array_equal(data, truth.values)
    assert truth.filler_indices.shape[0] == 0
    assert stop["samples"] == stop["sent_samples"] == data.shape[0]
    edges, t, drops = truth.rtc_edges, truth.true_times, truth.rtc_drops
    ade_step = 1 / 8000 / (1 + 400e-6)
    assert edges.shape[0] >= 3
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_second = (t >= lo) & (t < hi)
        assert int(np.count_nonzero(in_second)) == 8000
        lost = drops[(drops >= lo) & (drops < hi)]
        assert lost.shape[0] in (3, 4)
        last = t[in_second][-1]
        assert np.allclose(lost, last + ade_step * np.arange(1, lost.shape[0] + 1), atol=5e-7)
        assert hi - ade_step <= lost[-1] < hi
        # The stream jumps over the lost samples: the next row is the first after the edge.
        after = t[np.searchsorted(t, hi)]
        assert after == pytest.approx(lost[-1] + ade_step, abs=5e-7)
    expected = meter.grid.interleaved(t, meter.config.circuit)[:, 0:2]
    assert np.all(np.abs(data[:, 0] - expected[:, 0]) < 0.5)


# ---------------------------------------------------------------- ground truth (§6)


async def test_ntp_history_and_corrections_in_the_truth(
    make_meter: MeterFactory, ntp_server: NtpServer
) -> None:
    """Ground truth of every SNTP sync (true error, confidence, rtt, true time) and of the
    §6.5 corrections it caused: duplicated stream indices and dropped sample instants."""
    meter = await make_meter(network_delay_s=0.002)
    boot = meter.ntp_history[-1]
    assert len(meter.ntp_history) == 1
    assert boot.confidence_ms == int(boot.rtt_s * 1000 / 2)
    assert abs(boot.error_s) <= (boot.rtt_s - 0.004) / 2 + 0.001  # SNTP's error bound
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "measures": "v,i"}})
    early, _ = await collect(c, 0.4)
    ntp_server.protocol.offset_s = 0.05  # the server jumps: the meter is now 50 ms behind
    await c.send({"cmd": "ntp"})
    frames, texts, _ = await read_until_reply(c, "ntp")
    assert "Correcting: 10 samples" in texts
    more, _ = await collect(c, 2.3)
    ntp_server.protocol.offset_s = -0.05  # and back: 100 ms ahead, drop 10
    await c.send({"cmd": "ntp"})
    frames2, texts2, _ = await read_until_reply(c, "ntp")
    assert "Correcting: -10 samples" in texts2
    rest, _ = await collect(c, 1.3)
    tail, stop = await stop_and_drain(c)
    await c.close()
    data = received(early + frames + more + frames2 + rest + tail, 2)

    assert len(meter.ntp_history) == 3
    for sync, offset in zip(meter.ntp_history[1:], (0.05, -0.05), strict=True):
        # The true error after each sync is the server's offset (symmetric 2 ms legs).
        assert abs(sync.error_s - offset) <= (sync.rtt_s - 0.004) / 2 + 0.001
        assert sync.confidence_ms == int(sync.rtt_s * 1000 / 2) >= 2
    truth = meter.session_truth()
    assert truth is not None
    np.testing.assert_array_equal(data, truth.values)
    dups = truth.correction_duplicates
    assert 2 <= dups.shape[0] <= 3  # one per 1000 samples after the first sync
    for d in dups:
        assert np.array_equal(data[d], data[d - 1])
        assert truth.true_times[d] == truth.true_times[d - 1]
        assert truth.kinds[d] == KIND_DUPLICATE
    first_sync, second_sync = meter.ntp_history[1].true_time, meter.ntp_history[2].true_time
    assert np.all(truth.true_times[dups] > first_sync)
    drops = truth.correction_drops
    # The -10 first cancel the +1s still pending: 10 - len(dups) of them.
    assert drops.shape[0] == dups.shape[0]
    assert np.all(drops > second_sync)
    assert np.allclose(np.diff(drops), 1 / 1000, atol=5e-7)  # consecutive (§6.5)
    assert not np.any(np.isin(truth.true_times, drops))
    assert stop["samples"] == data.shape[0]
    records = truth.sync_records
    assert [r.queued for r in records] == [10, -10]
    assert records[0].true_time == pytest.approx(first_sync, abs=0.005)
    # the count is read after the exchange (§6.5): the samples taken by then, give or take the
    # one whose instant falls in the same millisecond as the record's true time
    taken = int(np.count_nonzero(truth.true_times <= records[0].true_time))
    assert abs(records[0].total - taken) <= 1


# ------------------------------------------------- NTP during sampling (§4.8, §6.2, §6.5)


async def test_stop_duration_is_millis_and_a_blocking_sync_writes_the_rtc(
    make_meter: MeterFactory, ntp_server: NtpServer
) -> None:
    """A sync during sampling that steps the clock by +0.3 s: ``sample_duration`` is the
    ESP's ``millis()`` since the start (blind to the step, §4.8) while ``stop_ts`` jumps;
    the blocking sync writes the RTC (§6.2), whose seconds restart 0.5 s later; the rows
    still match the grid at their true instants.  ``ntp`` with ``bg`` writes no RTC."""
    meter = await make_meter(drift_ppm=500.0)
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "measures": "v,i"}})
    early, _ = await collect(c, 0.3)
    ntp_server.protocol.offset_s = 0.3
    await c.send({"cmd": "ntp"})
    frames, _, _ = await read_until_reply(c, "ntp")
    late, _ = await collect(c, 1.4)
    tail, stop = await stop_and_drain(c)
    data = received(early + frames + late + tail, 2)
    truth = meter.session_truth()
    assert truth is not None
    np.testing.assert_array_equal(data, truth.values)
    expected = meter.grid.interleaved(truth.true_times, meter.config.circuit)
    assert np.all(np.abs(data[:, 0] - expected[:, 0]) < 0.5)

    # The stop comes after the last row, but millis() truncates: within 1 ms of it, the
    # duration may read up to 1 ms short of the last row's instant on the ESP's clock.
    true_duration = truth.true_times[-1] - truth.true_start
    assert -0.001 <= stop["sample_duration"] / 1000 - true_duration * 1.0005 < 0.06
    boot, sync = meter.ntp_history
    # SNTP sets the clock to the server's time within half the round trip
    assert abs(sync.error_s - 0.3) <= sync.rtt_s / 2 + 0.001
    # both spans run on the ESP's oscillator: they differ by the step alone (the boot sync
    # had left its own error; two ms truncations and 500 ppm over < 1 s besides)
    clock_span = float(stop["stop_ts"]) - float(stop["start_ts"])
    step = sync.error_s - boot.error_s
    assert clock_span - stop["sample_duration"] / 1000 == pytest.approx(step, abs=0.003)
    assert truth.rtc_resets.shape[0] == 2
    assert 0 <= truth.rtc_resets[1] - sync.true_time < 0.005
    after = truth.rtc_edges[truth.rtc_edges > truth.rtc_resets[1]]
    assert after[0] == pytest.approx(truth.rtc_resets[1] + RTC_FIRST_EDGE_S, abs=1e-6)

    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 1000, "measures": "v,i"}})
    await collect(c, 0.3)
    await c.send({"cmd": "ntp", "payload": {"bg": True}})
    await collect(c, 0.5)
    await stop_and_drain(c)
    await c.close()
    assert len(meter.ntp_history) == 3  # the background sync happened ...
    truth = meter.session_truth()
    assert truth is not None
    assert truth.rtc_resets.tolist() == [truth.true_start]  # ... without writing the RTC


async def test_a_stalled_loop_reports_the_seconds_it_missed(make_meter: MeterFactory) -> None:
    """§4.7: after a stall spanning RTC seconds, one ``Loop <n>s behind`` (WARNING) with
    n = seconds passed - 1; full seconds never log ``MISSED``."""
    meter = await make_meter()
    c = await open_client(meter.command_port)
    await c.command({"cmd": "sample", "payload": {"type": "TCP", "rate": 100, "measures": "v,i"}})
    _, before = await collect(c, 0.8)
    meter.stall_output(2.2)
    _, after = await collect(c, 2.6)
    await stop_and_drain(c)
    await c.close()
    texts = log_texts(before + after)
    behind = [int(m.group(1)) for t in texts if (m := re.fullmatch(r"Loop (\d+)s behind", t))]
    assert behind and behind[0] in (1, 2)
    truth = meter.session_truth()
    assert truth is not None
    assert truth.rtc_counts[1:].tolist() == [100] * (truth.rtc_counts.shape[0] - 1)
    assert not [t for t in texts if t.startswith("MISSED")]
