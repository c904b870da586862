"""A reconnect must reach the *same* meter, and the blocking facade never loses a block.

Both guard against samples going to, or commands reaching, the wrong place:

* ephemeral ports (and DHCP addresses) are reused: a client whose meter went away may find
  another meter at its old address; its commands (a late ``stop``) must not reach it;
* a blocking ``next_block`` whose wait times out while the loop thread is slow must not
  discard a block the request already took off the session.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    ConnectionLost,
    MeterClient,
    MeterConnectionError,
    MeterTimeoutError,
    SampleConfig,
)
from smartmeter_ophyd.emulator import EmulatedMeter

from .client_fakes import emulator_config


async def test_reconnect_refuses_another_meter_at_the_same_address() -> None:
    old = EmulatedMeter(emulator_config(name="gone"))
    await old.start()
    port = old.command_port
    client = AsyncMeterClient("127.0.0.1", port, timeout=1.0, reconnect=True,
                              reconnect_backoff=(0.05, 0.1))
    events: list[object] = []
    client.subscribe_events(events.append)
    await client.connect()
    await old.stop()
    new = EmulatedMeter(emulator_config(name="fresh", command_port=port))
    await new.start()
    try:
        deadline = time.monotonic() + 5
        while not any(isinstance(e, ConnectionLost) and "not reconnecting" in e.reason
                      for e in events):
            assert time.monotonic() < deadline, f"no refusal seen: {events}"
            await asyncio.sleep(0.05)
        assert not client.connected
        with pytest.raises(MeterConnectionError, match="'fresh', not 'gone'"):
            await client.stop()
        deadline = time.monotonic() + 2  # the meter polls for disconnects every 100 ms (§2.1)
        while new.endpoints():
            assert time.monotonic() < deadline, "the refused connection was left open"
            await asyncio.sleep(0.05)
        assert not new.sampling
    finally:
        await client.close()
        await new.stop()


async def test_reconnect_to_the_same_meter_still_works() -> None:
    meter = EmulatedMeter(emulator_config(name="same"))
    await meter.start()
    try:
        async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=1.0,
                                    reconnect_backoff=(0.05, 0.1)) as client:
            meter.drop_connections()
            deadline = time.monotonic() + 5
            while not client.connected or client.info is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert (await client.get_info()).name == "same"
    finally:
        await meter.stop()


def test_blocking_next_block_keeps_a_block_taken_after_its_wait_gave_up(meter_thread) -> None:
    client = MeterClient("127.0.0.1", meter_thread, timeout=2.0)
    try:
        client.connect()
        session = client.sample(SampleConfig(rate=8000))
        deadline = time.monotonic() + 10
        while not session.session.queued_blocks and time.monotonic() < deadline:
            time.sleep(0.05)
        loop = client.loop
        # Stall the loop longer than the blocking wait's limit (0.01 * 3 + 1 s), right before
        # the next_block request's first step: it takes a block after the caller gave up.
        loop.call_soon_threadsafe(lambda: loop.call_soon(time.sleep, 1.5))
        with pytest.raises(MeterTimeoutError):
            session.next_block(0.01)
        summary = session.stop()
        taken = 0
        while (block := session.next_block(1.0)) is not None:
            taken += block.n_samples
        assert taken == summary.received_samples > 0
    finally:
        client.close()


@pytest.fixture
def meter_thread():
    """An emulated meter on its own loop thread (the blocking client owns another)."""
    import threading

    loop = asyncio.new_event_loop()
    meter = EmulatedMeter(emulator_config(name="blocking"))
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(meter.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield meter.command_port
    asyncio.run_coroutine_threadsafe(meter.stop(), loop).result(10)
    asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
