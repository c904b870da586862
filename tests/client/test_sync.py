"""The blocking MeterClient: same client on a private loop thread, no thread left behind."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from smartmeter_ophyd.client import MeterBusyError, MeterClient, SampleConfig
from smartmeter_ophyd.emulator import EmulatedMeter

from .client_fakes import emulator_config


@pytest.fixture
def threaded_meter():
    """An emulator on its own loop thread, so blocking calls can be made from this thread."""
    loop = asyncio.new_event_loop()
    meter = EmulatedMeter(emulator_config(name="syncemu"))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(meter.start(), loop).result(10)
    yield meter
    asyncio.run_coroutine_threadsafe(meter.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_sync_commands_and_session(threaded_meter):
    with MeterClient("127.0.0.1", threaded_meter.command_port, timeout=3.0) as client:
        assert client.info.name == "syncemu"
        assert client.meter_label == f"smartmeter syncemu (127.0.0.1:{threaded_meter.command_port})"
        assert len(client.get_voltage().values) == 3
        assert client.get_info().state == "idle"
        logs = []
        unsubscribe = client.subscribe_logs(logs.append)
        session = client.sample(SampleConfig(rate=2000))
        assert session.channels[0] == "v_l1"
        with pytest.raises(MeterBusyError):
            client.get_current()
        received = 0
        deadline = time.monotonic() + 1.3
        for block in session:
            received += block.n_samples
            assert block.values.dtype == np.float32
            if time.monotonic() > deadline:
                break
        summary = session.stop()
        received += sum(b.n_samples for b in session.session.drain_nowait())
        assert summary.explained and summary.received_samples == received
        unsubscribe()
        assert any("Hz" in line.text for line in logs)  # the per-second rate log (§4.7)


def test_close_twice_and_thread_gone(threaded_meter):
    client = MeterClient("127.0.0.1", threaded_meter.command_port, timeout=3.0)
    client.connect()
    client.probe()
    client.close()
    client.close()
    assert not client.connected
