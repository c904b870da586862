"""What the SmartMeter flyer's consumer thread relies on from the blocking client.

The consumer pulls blocks with ``SyncSamplingSession.next_block(timeout)`` in a loop; every
block taken off the session must reach it, also when the client's loop thread is slow (a
loaded machine).  A failure here would silently drop samples from the HDF5 file while the
session summary (counted on arrival) still reconciles.
"""

from __future__ import annotations

import time

import pytest

from smartmeter_ophyd.client import MeterClient, MeterTimeoutError, SampleConfig
from smartmeter_ophyd.demo import EmulatedMeters
from smartmeter_ophyd.devices import SmartMeter


@pytest.mark.xfail(
    strict=True,
    reason=(
        "client bug: _LoopThread.run cancels the concurrent future on its own timeout; when "
        "the next_block task has already popped a block but its result is not yet copied to "
        "the future (loop stalled), the block is discarded (set_running_or_notify_cancel). "
        "Fix in smartmeter_ophyd/client/_sync.py: never cancel a next_block whose task may "
        "complete - rely on the coroutine's own timeout, or on timeout wait for the task to "
        "settle and return/requeue its block"
    ),
)
def test_next_block_never_loses_a_block_when_the_loop_stalls(emulated) -> None:
    client = MeterClient("127.0.0.1", emulated.meters[0].command_port, timeout=2.0)
    try:
        client.connect()
        session = client.sample(SampleConfig(rate=8000))
        taken = 0
        deadline = time.monotonic() + 10
        while not session.session._blocks and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until blocks are queued on the session
        loop = client._thread.loop
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


@pytest.mark.xfail(
    strict=True,
    reason=(
        "client: a reconnecting client does not check that it reached the same meter; after "
        "its meter went away and another meter took the (ephemeral) port, its stop() stops that "
        "meter's fly (the 'no stop reply (stopped elsewhere)' symptom). Fix in "
        "smartmeter_ophyd/client/_async.py (_reconnect_loop): refuse a reconnect whose info line "
        "names another meter (name/ip/compiled changed) or at least never send commands on it"
    ),
)
def test_a_stale_client_on_a_reused_port_cannot_stop_another_fly(tmp_path) -> None:
    with EmulatedMeters(1, name_prefix="gone") as old:
        port = old.meters[0].command_port
        stale = MeterClient("127.0.0.1", port, timeout=1.0, reconnect=True,
                            reconnect_backoff=(0.05, 0.1))
        stale.connect()
    meter = None
    try:
        with EmulatedMeters(1, name_prefix="fresh", command_port=port) as new:
            meter = SmartMeter("127.0.0.1", port, name="m1", data_directory=tmp_path, timeout=2.0)
            meter.connect()
            meter.prepare({"rate": 8000, "n_samples": 16000})
            meter.kickoff().wait(10)
            deadline = time.monotonic() + 5
            while not (stale.connected and stale.info.name == "fresh1"):
                assert time.monotonic() < deadline, "the stale client did not reconnect"
                time.sleep(0.05)
            try:
                stale.stop()  # e.g. a cleanup of the stale client's owner
            except Exception:
                pass  # refusing is the fix
            meter.complete().wait(20)
            assert meter.last_summary.ended_by == "stop"
            assert new.truth(0).sent_samples == meter.last_summary.received_samples
    finally:
        stale.close()
        if meter is not None:
            meter.destroy()
