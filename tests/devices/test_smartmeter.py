"""SmartMeter device against the real emulator over sockets, into real catalogs.

Ground truth comes from the emulator (``EmulatedMeter.truth()``: every sample it produced);
the catalog is read back through ``databroker.from_profile`` (embedded) or a PostgreSQL-backed
``tiled serve``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import databroker
import h5py
import numpy as np
import pytest
from event_model import DocumentNames, schema_validators

from plans import fly_meters
from smartmeter_ophyd.client import MeterBusyError, MeterCommandError, MeterConnectionError
from smartmeter_ophyd.devices import FlyConfig, SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.readback import meter_rows
from smartmeter_ophyd.storage import (
    close_client,
    connect_server,
    make_tiled_writer,
    read_gaps,
    read_stream,
)
from tests.devices.truth import meter_clock_and_truth
from tests.run_engines import RunEngine

RATE = 8000
SECONDS = 2.0


def run_with_validation(client: Any, plan: Any) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """Run ``plan`` into ``client`` via TiledWriter; validate every document's schema."""
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    engine.subscribe(make_tiled_writer(client))
    (uid,) = engine(plan)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    assert docs[-1][0] == "stop" and docs[-1][1]["exit_status"] == "success"
    return uid, docs


def check_fly_run(run: Any, meter: SmartMeter, emulated: EmulatorFleet,
                  docs: list[tuple[str, dict[str, Any]]]) -> None:
    summary = meter.last_summary
    assert summary is not None and summary.explained
    truth = emulated.truth(0)
    n_sent = summary.device_sent_samples
    assert n_sent == truth.sent_samples
    assert n_sent >= int(SECONDS * RATE)  # the target, plus the meter's tail (§4.8)

    ds = read_stream(run, "m1")
    channels = Measures.VI.channels
    got = np.stack([ds[f"m1_{ch}"].values for ch in channels], axis=1)
    assert got.shape == (n_sent, 6)  # every sample the meter sent is in the catalog
    assert got.dtype == np.float32
    expected = truth.values[:n_sent]
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))  # bit for bit
    t = ds["time"].values
    assert abs(t[0] - summary.start_ts) < 1e-6
    # the stored axis is the time model's: within 1 ms of the meter's clock where the emulator
    # really took each sample, and so within that clock's last sync of the truth
    meter_clock, true_times, clock_bound_s = meter_clock_and_truth(emulated, 0, n_sent)
    assert np.max(np.abs(t - meter_clock)) <= 1.2e-3
    assert np.max(np.abs(t - true_times)) <= clock_bound_s + 1.2e-3
    assert len(read_gaps(run, "m1_gaps")["sample_index"]) == 0
    assert len(read_gaps(run, "m1_gaps", prefix="m1")["sample_index"]) == 0  # gap-free run

    # per-run metadata in the catalog: start document, the summary table (with the meter's
    # state after the fly in its columns)
    start = run.start
    assert start["meters"]["m1"]["firmware"] == "2.2"
    assert start["meters"]["m1"]["fly"]["rate"] == RATE
    (row,) = meter_rows(run["meter_summary"].read())["m1"]
    assert row["segment"] == 0
    assert row["received_samples"] == row["device_sent_samples"] == n_sent
    assert row["explained"] is True and row["hdf5_path"] == str(meter.hdf5_path)
    assert row["start_ts"] == summary.start_ts and row["stop_ts"] == summary.stop_ts
    stored = json.loads(row["summary"])
    assert stored["device_sent_samples"] == n_sent and stored["ended_by"] == "stop"
    assert json.loads(row["sampling_reply"])["chunksize"] == 1008
    assert json.loads(row["stop_summary"])["device_sent_samples"] == n_sent
    assert row["firmware_version"] == "2.2" and row["meter_state"]
    (descriptor,) = [d for n, d in docs if n == "descriptor" and d["name"] == "meter_summary"]
    assert descriptor["data_keys"]["start_ts"]["units"] == "s"
    # HDF5 attributes hold the same
    with h5py.File(meter.hdf5_path, "r") as f:
        assert json.loads(f.attrs["stop_summary"])["received_samples"] == n_sent
        assert f.attrs["firmware"] == "2.2"
    # the stream's datums cover every sample (the writer flushes whole ~2 s compressed
    # chunks, so a 2 s fly is collected in one or two steps)
    datums = [d for n, d in docs if n == "stream_datum"]
    assert max(d["indices"]["stop"] for d in datums) == n_sent


def test_fly_into_embedded_catalog_bit_for_bit(emulated, embedded_catalog) -> None:
    meter = SmartMeter("127.0.0.1", emulated.meters[0].command_port, name="m1",
                       data_directory=embedded_catalog.data_directory, timeout=2.0)
    try:
        meter.connect()
        config = FlyConfig(rate=RATE, measures=Measures.VI, duration_s=SECONDS)
        uid, docs = run_with_validation(embedded_catalog.client, fly_meters([meter], config))
        client = databroker.from_profile(embedded_catalog.profile)
        try:
            check_fly_run(client[uid], meter, emulated, docs)
        finally:
            close_client(client)
    finally:
        meter.destroy()


def test_fly_into_postgres_tiled_server(emulated, postgres_server) -> None:
    hdf5_dir = Path(postgres_server["TILED_HDF5_DIR"])
    meter = SmartMeter("127.0.0.1", emulated.meters[0].command_port, name="m1",
                       data_directory=hdf5_dir, timeout=2.0)
    clients = []
    try:
        meter.connect()
        client = connect_server(postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"])
        clients.append(client)
        config = {"rate": RATE, "measures": "VI", "duration_s": SECONDS}
        uid, docs = run_with_validation(client, fly_meters([meter], config))
        reader = connect_server(postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"])
        clients.append(reader)
        check_fly_run(reader[uid], meter, emulated, docs)
    finally:
        meter.destroy()
        for each in clients:
            close_client(each)


def test_count_readings_land_in_catalog(meter, embedded_catalog) -> None:
    uid, docs = run_with_validation(embedded_catalog.client, bp.count([meter], num=2))
    (descriptor,) = [d for n, d in docs if n == "descriptor"]
    keys = descriptor["data_keys"]
    lines = ("l1", "l2", "l3")
    for line in lines:  # scalar float columns, one per line (not text-stored small arrays)
        assert keys[f"m1_voltage_{line}"]["units"] == "V"
        assert keys[f"m1_voltage_{line}"]["shape"] == [] and keys[f"m1_voltage_{line}"]["dtype"] == "number"
        assert keys[f"m1_current_{line}"]["units"] == "mA" and keys[f"m1_frequency_{line}"]["units"] == "Hz"
    assert descriptor["configuration"]["m1"]["data"]["m1_firmware_version"] == "2.2"
    events = [d for n, d in docs if n in ("event", "event_page")]
    assert events
    client = databroker.from_profile(embedded_catalog.profile)
    try:
        primary = client[uid]["primary"].read()

        def emitted(key: str) -> list[float]:
            return [d["data"][key] for n, d in docs if n == "event"] or [
                v for n, d in docs if n == "event_page" for v in d["data"][key]
            ]

        volts = np.stack([primary[f"m1_voltage_{line}"].values for line in lines], axis=1)
        assert volts.shape == (2, 3) and volts.dtype == np.float64
        assert np.array_equal(volts, np.array([emitted(f"m1_voltage_{line}") for line in lines]).T)
        assert ((volts > 150) & (volts < 300)).all()  # a 230 V grid
        freq = np.stack([primary[f"m1_frequency_{line}"].values for line in lines], axis=1)
        assert ((freq > 49) & (freq < 51)).all()
    finally:
        close_client(client)


def test_progress_watcher_sees_samples_grow_to_target(meter) -> None:
    n = 12_000
    meter.prepare({"rate": RATE, "n_samples": n}).wait(5)
    meter.kickoff().wait(10)
    status = meter.complete()
    seen: list[dict[str, Any]] = []
    status.watch(lambda **kw: seen.append(kw))
    status.wait(20)
    progress = [s for s in seen if "current" in s]
    assert all(s["target"] == n and s["initial"] == 0 and s["unit"] == "samples" for s in progress)
    currents = [s["current"] for s in progress]
    assert currents == sorted(currents) and len(set(currents)) > 3
    assert currents[-1] >= n
    assert currents[-1] == meter.last_summary.received_samples


def test_unreachable_host_names_the_host(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meter = SmartMeter("127.0.0.1", port, name="ghost", data_directory=tmp_path, timeout=1.0)
    assert not meter.connected  # construction did no I/O
    with pytest.raises(MeterConnectionError, match=f"127.0.0.1:{port}"):
        meter.connect()
    unresolvable = SmartMeter("no-such-meter.invalid", name="nx", data_directory=tmp_path, timeout=1.0)
    with pytest.raises(MeterConnectionError, match="no-such-meter.invalid"):
        unresolvable.wait_for_connection()
    meter.destroy()
    unresolvable.destroy()


@pytest.mark.parametrize(
    "value, message",
    [
        ({"rate": 12345}, "rate"),
        ({"rate": 8000, "measures": "volts"}, "measures"),
        ({"flow_control": "rts"}, "flow_control"),
        ({"duration_s": 1.0, "n_samples": 10}, "not both"),
        ({"n_samples": -5}, "n_samples"),
        ({"start_time": 12.5}, "start_time"),
        ({"speed": 3}, "unknown settings"),
        ("fast", "FlyConfig or a mapping"),
    ],
)
def test_bad_prepare_rejected_before_anything_is_sent(emulated, tmp_path, value, message) -> None:
    meter = SmartMeter("127.0.0.1", emulated.meters[0].command_port, name="m1",
                       data_directory=tmp_path, timeout=1.0)
    try:
        meter.connect()
        sent_before = emulated.call(lambda: emulated.meters[0].truth())
        with pytest.raises(MeterCommandError, match=message) as info:
            meter.prepare(value)
        assert "smartmeter" in str(info.value) and "127.0.0.1" in str(info.value)
        assert emulated.call(lambda: emulated.meters[0].truth()) is sent_before is None
        with pytest.raises(MeterCommandError, match="19|name"):
            meter.meter_name.set("x" * 40)  # validated by the codec, never sent
        assert emulated.call(lambda: emulated.meters[0].name) == "dev1"
    finally:
        meter.destroy()


def test_settings_are_sent_and_readings_refused_while_busy(meter, emulated) -> None:
    meter.meter_name.set("renamed").wait(5)
    assert emulated.call(lambda: emulated.meters[0].name) == "renamed"
    meter.calibration.set([1.0, 1.1, 1.0, 1.0, 1.0, 0.9]).wait(5)
    meter.refresh()
    assert meter.calibration.get() == [1.0, 1.1, 1.0, 1.0, 1.0, 0.9]
    assert meter.read_configuration()["m1_meter_name"]["value"] == "renamed"
    meter.prepare({"rate": 4000, "n_samples": 400_000})
    meter.kickoff().wait(10)
    try:
        status = meter.trigger()
        with pytest.raises(MeterBusyError, match="renamed"):
            status.wait(10)
        setting = meter.mqtt_server.set("broker.local")
        with pytest.raises(MeterBusyError):
            setting.wait(10)
    finally:
        meter.stop()
        meter.complete().wait(20)
    assert meter.last_summary.ended_by == "stop" and meter.last_summary.explained
    meter.trigger().wait(10)  # idle again: readings work
    assert all(200 < v < 260 for v in meter.voltage.get())


def test_reboot_during_fly_fails_complete_instead_of_hanging(meter, emulated) -> None:
    meter.prepare({"rate": RATE, "duration_s": 60})
    meter.kickoff().wait(10)
    time.sleep(0.3)
    emulated.call(emulated.meters[0].request_reboot)
    status = meter.complete()
    t0 = time.monotonic()
    with pytest.raises(MeterConnectionError):
        status.wait(20)
    assert time.monotonic() - t0 < 15
    # what arrived before the reboot is on disk, nothing was invented
    with h5py.File(meter.hdf5_path, "r") as f:
        n = f["v_l1"].shape[0]
    assert n > 0 and n == meter.last_summary.received_samples


def test_destroy_leaves_no_thread(emulated, tmp_path) -> None:
    before = set(threading.enumerate())
    meter = SmartMeter("127.0.0.1", emulated.meters[0].command_port, name="m1",
                       data_directory=tmp_path, timeout=1.0)
    meter.connect()
    meter.prepare({"n_samples": 2000})
    meter.kickoff().wait(10)
    meter.complete().wait(10)
    meter.destroy()
    for _ in range(40):
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            break
        time.sleep(0.05)
    assert not extra
