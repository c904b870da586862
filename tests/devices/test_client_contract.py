"""What the SmartMeter flyer's consumer thread relies on from the blocking client.

The consumer pulls blocks with ``SyncSamplingSession.next_block(timeout)`` in a loop; every
block taken off the session must reach it, also when the client's loop thread is slow (a
loaded machine).  A failure here would silently drop samples from the HDF5 file while the
session summary (counted on arrival) still reconciles.
"""

from __future__ import annotations

import time

import pytest

from smartmeter_ophyd.client import (
    MeterClient,
    MeterConnectionError,
    MeterTimeoutError,
    SampleConfig,
)
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.emulator import EmulatorFleet


def test_next_block_never_loses_a_block_when_the_loop_stalls(emulated) -> None:
    """A blocking next_block that times out while its block is in transit must not drop it."""
    client = MeterClient("127.0.0.1", emulated.meters[0].command_port, timeout=2.0)
    try:
        client.connect()
        session = client.sample(SampleConfig(rate=8000))
        taken = 0
        deadline = time.monotonic() + 10
        while not session.session.queued_blocks and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until blocks are queued on the session
        loop = client.loop
        # Stall the loop for longer than the blocking wait's limit (0.01 * 3 + 1 s) right
        # before the next_block task's first step: the task then pops a block and completes
        # after the blocking caller has already given up.
        loop.call_soon_threadsafe(lambda: loop.call_soon(time.sleep, 1.5))
        with pytest.raises(MeterTimeoutError):
            block = session.next_block(0.01)
            taken += block.n_samples if block is not None else 0
        summary = session.stop()
        while (block := session.next_block(1.0)) is not None:
            taken += block.n_samples
        assert taken == summary.received_samples
    finally:
        client.close()


def test_a_stale_client_on_a_reused_port_cannot_stop_another_fly(tmp_path) -> None:
    """The cause of the intermittent 'no stop reply (stopped elsewhere)' fly failure: a client
    whose meter went away reconnected to the meter that took its ephemeral port and stopped
    that meter's fly.  The client now refuses to reconnect to a different meter."""
    with EmulatorFleet(1, name_prefix="gone") as old:
        port = old.meters[0].command_port
        stale = MeterClient("127.0.0.1", port, timeout=1.0, reconnect=True,
                            reconnect_backoff=(0.05, 0.1))
        stale.connect()
    meter = None
    try:
        with EmulatorFleet(1, name_prefix="fresh", command_port=port) as new:
            meter = SmartMeter("127.0.0.1", port, name="m1", data_directory=tmp_path, timeout=2.0)
            meter.connect()
            meter.prepare({"rate": 8000, "n_samples": 16000})
            meter.kickoff().wait(10)
            time.sleep(0.5)  # several reconnect attempts of the stale client meanwhile
            assert not stale.connected
            with pytest.raises(MeterConnectionError, match="now answers as meter 'fresh1'"):
                stale.stop()  # e.g. a cleanup by the stale client's owner
            meter.complete().wait(20)
            assert meter.last_summary.ended_by == "stop"
            assert new.truth(0).sent_samples == meter.last_summary.received_samples
    finally:
        stale.close()
        if meter is not None:
            meter.destroy()


def test_next_block_after_its_own_poll_timeout_still_delivers(emulated) -> None:
    client = MeterClient("127.0.0.1", emulated.meters[0].command_port, timeout=2.0)
    try:
        client.connect()
        session = client.sample(SampleConfig(rate=8000, flow_control=True))  # paused (§5.1)
        with pytest.raises(MeterTimeoutError):
            session.next_block(0.05)  # nothing comes while paused: the poll times out
        session.cts(True)
        block = session.next_block(2.0)
        assert block is not None and block.n_samples > 0
        session.stop()
    finally:
        client.close()
