"""UDP datagrams duplicated and reordered on the way to the host (issue 9, fault matrix).

The emulator's network fault injection (control ops ``duplicate_udp`` / ``reorder_udp``,
next to ``drop_udp``) acts on the datagrams after they left the device (§4.13): the
meter's own ``sent_samples`` (§4.8) counts each once.  First the faults themselves are
checked on the wire, then each runs through ``plans.synchronized_fly`` with UDP transport:

* every sample is accounted for: received + declared missing == what the meter sent;
* nothing is invented: each stored frame is, bit for bit, the meter's frame of that packet
  number, and no packet is stored twice (a duplicate is not double-counted);
* a datagram overtaken by its successor is declared missing when the successor arrives,
  and kept aside (not inserted) when it comes late — the client does not reorder.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import h5py
import numpy as np
import pytest

import plans
from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import read_packets

from ._support import assert_accounted, assert_idle, when_sampling

RATE = 1000
UDP_CHUNK = 504 // Measures.VI.bytes_per_sample  # §4.5: 21 samples per datagram, 24-byte modes


# ------------------------------------------------------------------ the faults on the wire

def udp_packets(fleet: Any, fault: str, count: int) -> list[int]:
    """Packet numbers of the datagrams a raw UDP receiver gets in 0.4 s of a 1 kHz session
    whose first ``count`` datagrams meet ``fault``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.create_connection(fleet.addresses[0], timeout=5) as tcp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(0.3)
        tcp.settimeout(5)
        lines = tcp.makefile("rb")
        assert lines.readline().startswith(b"Info:")  # the info line (§2.5)
        fleet.inject(0, fault, count=count)
        sample = {"cmd": "sample", "payload": {"type": "UDP", "rate": RATE,
                                               "port": udp.getsockname()[1]}}
        tcp.sendall(json.dumps(sample).encode() + b"\n")
        packets: list[int] = []
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            try:
                data = udp.recv(2048)
            except TimeoutError:
                continue
            assert data.startswith(b"Data:")
            packets.append(int.from_bytes(data[7:11], "little"))
        tcp.sendall(b'{"cmd":"stop"}\n')
        while b'"cmd":"stop"' not in lines.readline():
            pass
    return packets


def test_duplicate_udp_sends_each_of_the_next_datagrams_twice(fleet_factory) -> None:
    fleet = fleet_factory(1, chrony=False)
    packets = udp_packets(fleet, "duplicate_udp", 3)
    assert packets[:7] == [0, 0, 1, 1, 2, 2, 3], packets
    assert packets[6:] == list(range(3, 3 + len(packets) - 6))


def test_reorder_udp_swaps_each_of_the_next_datagrams_with_its_successor(fleet_factory) -> None:
    fleet = fleet_factory(1, chrony=False)
    packets = udp_packets(fleet, "reorder_udp", 2)
    assert packets[:5] == [1, 0, 3, 2, 4], packets
    assert sorted(packets) == list(range(len(packets)))  # each datagram exactly once


def test_a_udp_fault_needs_a_count_it_can_use(fleet_factory) -> None:
    fleet = fleet_factory(1, chrony=False)
    for bad in (-1, 2.5, "3"):
        with pytest.raises(ValueError, match=r"smartmeter plan\S*: .*'count'"):
            fleet.inject(0, "reorder_udp", count=bad)


# ------------------------------------------------------------------ through a fly

def stored_frames(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples (n, 6), packet numbers, each packet's sample count) of a meter's file."""
    with h5py.File(path, "r") as f:
        values = np.stack([f[ch][()] for ch in Measures.VI.channels], axis=1)
    packets = read_packets(path)
    counts = np.diff(np.append(packets["first_sample"], len(values)))
    return values, packets["packet"], counts


def assert_nothing_invented(meter: Any, truth: Any) -> None:
    """Each stored frame is the meter's frame of that packet number, bit for bit, once."""
    values, packets, counts = stored_frames(meter.hdf5_path)
    assert len(np.unique(packets)) == len(packets), "a packet was stored twice"
    assert np.all(np.diff(packets) > 0), "frames stored out of packet order"
    expected = np.concatenate([truth.values[p * UDP_CHUNK: p * UDP_CHUNK + n]
                               for p, n in zip(packets, counts, strict=True)])
    assert np.array_equal(values.view(np.uint32), expected.view(np.uint32))


def udp_fly(fleet_factory, smartmeters, engine, embedded_catalog,
            faults: list[tuple[str, int]]) -> tuple[Any, Any, dict[str, Any]]:
    fleet = fleet_factory(1)
    (meter,) = smartmeters(fleet)

    def inject() -> None:
        for fault, count in faults:
            fleet.inject(0, fault, count=count)

    thread = when_sampling(engine, inject, after_s=0.3)
    started = time.monotonic()
    engine.RE(plans.synchronized_fly([meter], 1.5, rate=RATE, transport="UDP"))
    thread.join(10)
    assert time.monotonic() - started < 20
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success"
    assert_idle(fleet)
    run = embedded_catalog.client[stop["run_start"]]
    truth = fleet.truth(0)
    summary = assert_accounted(run, meter, truth.sent_samples)
    assert_nothing_invented(meter, truth)
    return run, truth, summary


def test_duplicated_datagrams_are_counted_once_and_nothing_is_declared_missing(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    run, truth, summary = udp_fly(fleet_factory, smartmeters, engine, embedded_catalog,
                                  [("duplicate_udp", 4)])
    assert summary["received_samples"] == truth.sent_samples  # the copies added nothing
    assert summary["missing_samples"] == 0 and summary["explained"]
    details = json.loads(summary["summary"])
    assert details["late_samples"] == 4 * UDP_CHUNK  # the 4 copies, kept aside
    # nothing was declared missing, so no note may say the copies were
    assert not any("declared missing," in note for note in details["notes"]), details["notes"]


def test_reordered_datagrams_are_declared_missing_then_kept_aside_not_inserted(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    run, truth, summary = udp_fly(fleet_factory, smartmeters, engine, embedded_catalog,
                                  [("reorder_udp", 3)])
    # each overtaken datagram: declared missing when its successor came, late when it came
    assert summary["missing_samples"] == 3 * UDP_CHUNK and summary["explained"]
    assert json.loads(summary["summary"])["late_samples"] == 3 * UDP_CHUNK
    gaps = run["m1_gaps"].read()
    assert gaps.sizes["time"] == 3  # where: one gap record per overtaken datagram


def test_lost_duplicated_and_reordered_datagrams_together_are_all_accounted_for(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    run, truth, summary = udp_fly(
        fleet_factory, smartmeters, engine, embedded_catalog,
        [("drop_udp", 2), ("duplicate_udp", 3), ("reorder_udp", 2)])
    assert summary["missing_samples"] == (2 + 2) * UDP_CHUNK and summary["explained"]
    assert summary["gaps"] == 3  # the 2 lost in a row make one gap; each overtaken one more
