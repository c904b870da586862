"""The meter's stream broken mid-frame during ``plans.synchronized_fly`` (issue 9).

A proxy (``_proxy.StreamProxy``) sits between the SmartMeter device and an emulated meter
and records every frame it forwards:

* a truncated frame at EOF: the link closes in the middle of a ``Data:`` frame.  The run
  fails naming the meter; every complete frame that reached the host is stored bit for bit
  (the emulator's ground truth), the partial one is declared missing, nothing is invented;
* a stream that turns into a ``Data:`` frame of huge length followed by endless bytes: the
  fly ends in a clear error naming the meter, within the device's silence timeout, and the
  decoder's memory stays bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import pytest

import plans
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import read_stream

from ._proxy import StreamProxy
from ._support import assert_idle, run_summary, when_sampling

RATE = 8000
CHUNK = 1008 // Measures.VI.bytes_per_sample  # §4.5: 42 samples per TCP frame at 8 kHz


@pytest.fixture
def proxied(fleet_factory, embedded_catalog, request
            ) -> Iterator[tuple[Any, StreamProxy, SmartMeter]]:
    fleet = fleet_factory(1)
    proxy = StreamProxy(fleet.addresses[0])
    timeout = getattr(request, "param", 3.0)
    meter = SmartMeter(*proxy.address, name="m1", data_directory=embedded_catalog.data_directory,
                       timeout=timeout, reconnect=False)
    yield fleet, proxy, meter
    meter.destroy()
    proxy.close()


def fly(engine: Any, meter: SmartMeter) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        engine.RE(plans.synchronized_fly([meter], 3.0, rate=RATE))
        error = None
    except Exception as exc:  # the run failed: its stop document says why
        error = exc
    return error, time.monotonic() - started


def test_a_frame_cut_by_the_closing_link_is_declared_missing_not_invented(
    proxied, engine, embedded_catalog
) -> None:
    fleet, proxy, meter = proxied
    thread = when_sampling(engine, proxy.cut_next_frame)
    error, took = fly(engine, meter)
    thread.join(10)
    assert error is not None and meter.meter_label in str(error), error
    assert "connection lost" in str(error)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and meter.meter_label in stop["reason"]
    assert_idle(fleet)  # the meter saw its client go and stopped (§4.9)

    assert proxy.cut_frame is not None
    cut_packet, declared, forwarded = proxy.cut_frame
    assert 0 < forwarded < declared == CHUNK * Measures.VI.bytes_per_sample
    assert [p for p, _ in proxy.frames] == list(range(cut_packet))  # all whole frames before
    reached = cut_packet * CHUNK  # samples in the whole frames that reached the host

    run = embedded_catalog.client[stop["run_start"]]
    summary = run_summary(run, meter)
    assert summary["received_samples"] == reached, summary
    assert summary["received_samples"] + summary["missing_samples"] == reached + CHUNK, summary
    with h5py.File(meter.hdf5_path, "r") as f:
        stored = np.stack([f[ch][()] for ch in Measures.VI.channels], axis=1)
    truth = fleet.truth(0).values[:reached]
    assert np.array_equal(stored.view(np.uint32), truth.view(np.uint32))  # nothing invented
    assert took < 15


@pytest.mark.parametrize("proxied", [1.0], indirect=True)  # silence limit 4 x timeout
def test_a_stream_turned_into_a_huge_data_frame_ends_the_fly_with_a_meter_error(
    proxied, engine, embedded_catalog
) -> None:
    fleet, proxy, meter = proxied
    thread = when_sampling(engine, proxy.turn_hostile)
    error, took = fly(engine, meter)
    thread.join(10)
    assert error is not None and meter.meter_label in str(error), error
    assert "no sample data" in str(error)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and meter.meter_label in stop["reason"]
    assert proxy.hostile_bytes > 1 << 20  # megabytes of it reached the client
    # what came before is kept and counted: the run's summary says how much
    run = embedded_catalog.client[stop["run_start"]]
    summary = run_summary(run, meter)
    forwarded = sum(n for _, n in proxy.frames) // Measures.VI.bytes_per_sample
    assert summary["received_samples"] == forwarded > 0, summary
    assert read_stream(run, "m1", prefix="m1").sizes["time"] == forwarded
    assert json.loads(summary["summary"])["ended_by"] == "stop timed out"
    # silence limit (4 s) + the stop reply's wait (10 s) + setup, however much is flooded
    assert took < 25
