"""``meter.ntp`` over real sockets: emulated meters synced to the real chrony or to the fleet's
SNTP responder, checked against the emulator's ground truth (its last SNTP exchange)."""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import bluesky.plan_stubs as bps
import pytest
from bluesky.utils import FailedStatus

from smartmeter_ophyd.devices import NtpSyncError, SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet
from tests.run_engines import RunEngine

OFFSET_LINE = re.compile(rb"Offset of (-?\d+\.\d{3}) s, SecondInterrupts")
TO_LINE = re.compile(rb"\]\d\d/\d\d \d\d:\d\d:\d\d: To (\d+\.\d{3})\r\n")


class RawLines:
    """A plain TCP connection to a meter that keeps every byte it receives."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._sock = socket.create_connection(address, timeout=2.0)
        self._buffer = b""

    def __enter__(self) -> RawLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float = 3.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while (found := pattern.search(self._buffer)) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pattern.pattern!r} not received"
            self._sock.settimeout(remaining)
            self._buffer += self._sock.recv(65536)
        return found


def _device(fleet: EmulatorFleet, tmp_path: Any, *, connect: bool = True) -> SmartMeter:
    host, port = fleet.addresses[0]
    meter = SmartMeter(host, port, name="m1", data_directory=tmp_path / "hdf5", timeout=2.0)
    if connect:
        meter.connect()
    return meter


def _truth_confidence(fleet: EmulatorFleet) -> tuple[int, float]:
    """(confidence the emulator logged, its clock's true error) of the last SNTP exchange."""
    emulated = fleet.meter(0)
    result = fleet.call(lambda: emulated.last_sntp)
    assert result is not None
    return result.confidence_ms, result.error_s


@pytest.fixture
def chrony_fleet(ntp_server: tuple[str, int]) -> Iterator[EmulatorFleet]:
    host, port = ntp_server
    with EmulatorFleet(1, name_prefix="ntpc", time_server=host, ntp_port=port) as fleet:
        yield fleet


@pytest.fixture
def meter(chrony_fleet: EmulatorFleet, tmp_path: Any) -> Iterator[SmartMeter]:
    device = _device(chrony_fleet, tmp_path)
    yield device
    device.destroy()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port that receives and never answers (the firmware waits its 200 ms, §6.2)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _dead_port() -> int:
    """A UDP port nothing listens on (ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_idle_sync_against_chrony_records_the_meters_confidence_and_time(chrony_fleet, meter):
    before = time.time()
    status = meter.ntp.trigger()
    status.wait(5)
    after = time.time()
    confidence, error_s = _truth_confidence(chrony_fleet)
    reading = meter.ntp.read()
    assert reading["m1_ntp_confidence_ms"]["value"] == confidence
    assert reading["m1_ntp_succeeded"]["value"] is True
    assert math.isnan(reading["m1_ntp_offset_s"]["value"])  # idle: no §6.5 offset line
    # synced_at is the meter's clock (reply current_time, 1 ms): minus the clock's true
    # error it must fall inside the host's window around the exchange
    synced_true = reading["m1_ntp_synced_at"]["value"] - error_s
    assert before - 0.0015 <= synced_true <= after + 0.0015
    record = meter.ntp.last_record
    assert record is not None and not record.during_sampling and record.problems == ()
    assert meter.ntp.hints == {"fields": ["m1_ntp_confidence_ms"]}


def test_synced_at_is_the_meters_clock_not_the_hosts(tmp_path):
    """The fleet's responder serves time 250 ms ahead: after the sync the meter's clock is
    250 ms ahead of the host, and synced_at must say so (never the host's receive time)."""
    with EmulatorFleet(1, name_prefix="ntpo", time_offset_s=0.25) as fleet:
        meter = _device(fleet, tmp_path)
        try:
            before = time.time()
            meter.ntp.trigger().wait(5)
            after = time.time()
            _, error_s = _truth_confidence(fleet)
        finally:
            meter.destroy()
    synced_at = meter.ntp.synced_at.get()
    assert abs(error_s - 0.25) < 0.01  # ground truth: the meter's clock is 250 ms ahead
    assert before - 0.0015 <= synced_at - error_s <= after + 0.0015
    assert synced_at > after + 0.2


def test_sync_while_sampling_reads_the_offset_from_the_meters_record(tmp_path):
    """The fleet's responder jumps +40 ms during sampling: offset_s is the meter's ``Offset
    of`` (as a second, raw connection reads it: log lines go to every client, §2.4),
    synced_at its ``To`` timestamp, and the record has the capped +10 correction."""
    with EmulatorFleet(1, name_prefix="ntps") as fleet, RawLines(fleet.addresses[0]) as raw:
        meter = _device(fleet, tmp_path)
        try:
            session = meter.client.sample(rate=1000)
            time.sleep(0.5)
            fleet.time_offset_s = 0.04
            sent = time.time()
            meter.ntp.trigger().wait(5)
            session.stop()
            confidence, _ = _truth_confidence(fleet)
            reading = meter.ntp.read()
        finally:
            meter.destroy()
        logged = raw.wait_for(OFFSET_LINE)
        to_line = raw.wait_for(TO_LINE)
    record = meter.ntp.last_record
    assert record is not None and record.during_sampling and record.problems == ()
    assert reading["m1_ntp_confidence_ms"]["value"] == confidence == record.confidence_ms
    assert reading["m1_ntp_offset_s"]["value"] == float(logged.group(1))
    assert abs(reading["m1_ntp_offset_s"]["value"] - 0.04) < 0.02  # the step, roughly
    assert reading["m1_ntp_synced_at"]["value"] == record.to_ts == float(to_line.group(1))
    assert abs(record.to_ts - (sent + 0.04)) < 0.2  # the meter's clock now follows the server
    assert record.correction == 10  # about 40 samples short at 1 kHz, capped (§6.5)


def test_unreachable_time_server_fails_naming_the_meter(tmp_path):
    with EmulatorFleet(1, name_prefix="ntpd", time_server="127.0.0.1", ntp_port=_dead_port()) as fleet:
        meter = _device(fleet, tmp_path)
        try:
            status = meter.ntp.trigger()
            with pytest.raises(NtpSyncError) as caught:
                status.wait(5)
            label = meter.meter_label
        finally:
            meter.destroy()
    message = str(caught.value)
    assert message.startswith(label) and "smartmeter ntpd1" in message
    assert "Error syncing time" in message and "'127.0.0.1'" in message
    assert meter.ntp.succeeded.get() is False and math.isnan(meter.ntp.confidence_ms.get())


def test_connection_drop_during_the_sync_fails_the_status(tmp_path, silent_port):
    with EmulatorFleet(
        1, name_prefix="ntpx", time_server="127.0.0.1", ntp_port=silent_port
    ) as fleet:
        meter = _device(fleet, tmp_path)
        try:
            status = meter.ntp.trigger()
            time.sleep(0.05)  # the meter now waits up to 200 ms for the silent server
            fleet.inject(0, "drop_connections")
            with pytest.raises(NtpSyncError, match="connection lost") as caught:
                status.wait(5)
        finally:
            meter.destroy()
    assert str(caught.value).startswith("smartmeter ntpx1 (")
    assert meter.ntp.succeeded.get() is False


def test_log_level_above_info_is_refused_before_sending(chrony_fleet, meter):
    meter.log_level.put("WARNING")
    status = meter.ntp.trigger()
    with pytest.raises(NtpSyncError, match="log level is WARNING"):
        status.wait(5)
    meter.log_level.put("INFO")
    meter.ntp.trigger().wait(5)
    assert meter.ntp.succeeded.get() is True
    assert meter.ntp.confidence_ms.get() == _truth_confidence(chrony_fleet)[0]


def test_not_connected_fails_the_status_naming_the_meter(chrony_fleet, tmp_path):
    meter = _device(chrony_fleet, tmp_path, connect=False)
    try:
        with pytest.raises(NtpSyncError, match=r"^smartmeter m1 .*not connected"):
            meter.ntp.trigger().wait(5)
    finally:
        meter.destroy()


def test_trigger_and_read_in_a_run_engine(chrony_fleet, meter):
    engine = RunEngine({})
    docs: list[tuple[str, dict[str, Any]]] = []

    def plan():  # type: ignore[no-untyped-def]
        yield from bps.open_run()
        yield from bps.trigger_and_read([meter.ntp])
        yield from bps.trigger(meter.ntp, wait=True)
        yield from bps.trigger_and_read([meter.ntp])
        yield from bps.close_run()

    engine(plan(), lambda name, doc: docs.append((name, doc)))
    events = [doc for name, doc in docs if name == "event"]
    assert len(events) == 2
    confidence, _ = _truth_confidence(chrony_fleet)
    assert events[-1]["data"]["m1_ntp_confidence_ms"] == confidence
    assert all(e["data"]["m1_ntp_succeeded"] is True for e in events)
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    assert descriptor["data_keys"]["m1_ntp_confidence_ms"]["units"] == "ms"
    assert descriptor["hints"]["m1_ntp"] == {"fields": ["m1_ntp_confidence_ms"]}
    assert next(doc for name, doc in docs if name == "stop")["exit_status"] == "success"


def test_a_failed_sync_fails_the_plan(tmp_path):
    with EmulatorFleet(1, name_prefix="ntpf", time_server="127.0.0.1", ntp_port=_dead_port()) as fleet:
        meter = _device(fleet, tmp_path)
        engine = RunEngine({})
        try:
            with pytest.raises(FailedStatus) as caught:
                engine(bps.trigger(meter.ntp, wait=True))
        finally:
            meter.destroy()
    cause = caught.value.__cause__ or caught.value.args[0]
    text = f"{cause!r} {caught.value!r}"
    assert "smartmeter ntpf1" in text and "Error syncing time" in text
