"""What users touch on a SmartMeter beyond its protocols: a cheap repr, and the run saying why a
fly stopped when the RunEngine was aborted (the emulator over real sockets)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import pytest
from bluesky.utils import RunEngineInterrupted
from ophyd import Device

from plans import fly_meters
from smartmeter_ophyd.devices import FlyConfig, SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from tests.run_engines import RunEngine


def test_repr_names_the_meter_and_reads_nothing(emulated: EmulatorFleet, tmp_path: Path) -> None:
    """The repr says which meter and its state from attributes only; ophyd's default walks
    every component (read_attrs, configuration_attrs) and costs ~1.4 ms a meter."""
    port = emulated.meters[0].command_port
    meters = [SmartMeter("127.0.0.1", port, name=f"m{i}", data_directory=tmp_path,
                         emulated=i == 0) for i in range(50)]
    try:
        assert repr(meters[0]) == (f"SmartMeter(name='m0', host='127.0.0.1', port={port}, "
                                   "emulated=True, state='not connected')")
        assert repr(meters[1]).endswith(f"port={port}, state='not connected')")
        meters[0].connect()
        assert repr(meters[0]).endswith("state='connected')")

        def timed(fn: Any) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for meter in meters:
                    fn(meter)
                best = min(best, time.perf_counter() - t0)
            return best

        ours, ophyds = timed(repr), timed(Device.__repr__)
        assert ours * 10 < ophyds, (ours, ophyds)
        # unreachable host: still instant (no connect, no network)
        far = SmartMeter("192.0.2.1", 1, name="far", data_directory=tmp_path, timeout=5.0)
        t0 = time.perf_counter()
        assert "name='far'" in repr(far) and "'not connected'" in repr(far)
        assert time.perf_counter() - t0 < 0.5
        far.destroy()
    finally:
        for meter in meters:
            meter.destroy()


def test_abort_mid_fly_records_the_reason_and_who_stopped_the_meter(
    meter: SmartMeter, emulated: EmulatorFleet
) -> None:
    """bluesky's run_wrapper closes an aborted run without the reason given to
    ``RE.abort(reason)``; the device records that the plan or the RunEngine stopped its
    fly, in the run's ``meter_summary`` table and the HDF5 file."""
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: docs.append((name, doc)))

    def abort_when_sampling() -> None:
        deadline = time.monotonic() + 20
        while meter.samples_received < 2000 and time.monotonic() < deadline:
            time.sleep(0.02)
        engine.abort("operator: wrong circuit")

    thread = threading.Thread(target=abort_when_sampling, daemon=True)
    thread.start()
    with pytest.raises(RunEngineInterrupted):
        engine(fly_meters([meter], FlyConfig(duration_s=30.0)))
    thread.join(10)
    stop = docs[-1][1]
    assert docs[-1][0] == "stop" and stop["exit_status"] == "abort"
    assert not emulated.truth(0).active  # the meter was stopped

    assert meter.last_stop_reason is not None
    assert meter.last_stop_reason.startswith("stop() called: the plan or the RunEngine")
    (descriptor,) = [d for n, d in docs if n == "descriptor" and d["name"] == "meter_summary"]
    (page,) = [p for n, p in docs if n == "event_page" and p["descriptor"] == descriptor["uid"]]
    assert page["data"]["meter"] == ["m1"]
    recorded = json.loads(page["data"]["stop_summary"][0])
    assert recorded["stop_requested"] == meter.last_stop_reason
    assert recorded["ended_by"] == "stop"
    with h5py.File(meter.hdf5_path, "r") as f:
        in_file = json.loads(f.attrs["stop_summary"])
    assert in_file["stop_requested"] == meter.last_stop_reason
    assert in_file["received_samples"] == emulated.truth(0).sent_samples
