"""Every firmware command through AsyncMeterClient against the emulator (real sockets)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    MeterBusyError,
    MeterCommandError,
    MeterCommandRejected,
)
from smartmeter_ophyd.protocol import (
    DeviceInfo,
    EnergyReading,
    LineQuantity,
    LineValues,
    LogLevel,
    LogLine,
    PowerReading,
)


async def connect(meter, **kwargs) -> AsyncMeterClient:
    client = AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0, **kwargs)
    await client.connect()
    return client


async def test_connect_reads_info_and_names_meter(meter):
    client = await connect(meter)
    try:
        assert isinstance(client.info, DeviceInfo)
        assert client.info.name == "emu"
        assert client.info.version == "2.2"
        assert client.meter_label == f"smartmeter emu (127.0.0.1:{meter.command_port})"
        info = await client.get_info()
        assert info.name == "emu" and info.state == "idle"
    finally:
        await client.close()


async def test_readings(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        voltage = await client.get_voltage()
        assert isinstance(voltage, LineValues) and voltage.quantity is LineQuantity.VOLTAGE
        assert all(150 < v < 300 for v in voltage.values)
        current = await client.get_current()
        assert current.unit == "mA" and len(current.values) == 3
        frequency = await client.get_frequency()
        assert frequency.quantity is LineQuantity.FREQUENCY
        assert all(45 < f < 55 for f in frequency.values)
        angle = await client.get_phase_angle()
        assert angle.quantity is LineQuantity.PHASE_ANGLE
        power = await client.get_power()
        assert isinstance(power, PowerReading)
        assert power.apparent == power.reactive  # §12 #9, passed through as sent
        energy = await client.get_energy()
        assert isinstance(energy, EnergyReading) and len(energy.energy) == 3


async def test_settings_roundtrip(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        reply = await client.set_name("lab-7")
        assert reply.value == "lab-7"
        assert client.info.name == "lab-7"
        assert client.meter_label.startswith("smartmeter lab-7 ")
        assert (await client.set_mqtt_server("-")).value == "-"
        assert (await client.set_stream_server("-")).value == "-"
        reply = await client.set_calibration([1.0, 1.5, 1.0, 1.0, 0.5, 2.0])
        assert reply.message.startswith("Calibration set: v1:1.00, i1:1.50")
        reply = await client.set_daily_restart(3, 15)
        assert "03:15" in reply.message
        assert (await client.get_info()).daily_restart == (3, 15)
        assert "Disabled" in (await client.set_daily_restart(-1, -1)).message
        reply = await client.reset_energy((1.0, 2.0, 3.0), ts=1_600_000_000)
        assert reply.message.startswith("Energy reset to [1.00, 2.00, 3.00]")
        level = await client.set_log_level("warning")
        assert level.level is LogLevel.WARNING and client.log_level is LogLevel.WARNING
        await client.clear_log()
        assert isinstance(await client.get_log(), list)


async def test_wifi_password_never_logged(meter, caplog):
    caplog.set_level(logging.DEBUG)
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        added = await client.add_wifi("labnet", "s3cretpw")
        assert added.succeeded and "labnet" in added.ssids  # inverted flag handled (§3.6)
        duplicate = await client.add_wifi("labnet", "s3cretpw")
        assert duplicate.outcome.name == "DUPLICATE"
        removed = await client.del_wifi("labnet")
        assert removed.outcome.name == "REMOVED" and "labnet" not in removed.ssids
        with pytest.raises(MeterCommandRejected, match="not found"):
            await client.del_wifi("labnet")
    assert "s3cretpw" not in caplog.text


async def test_wifi_list_full_is_rejected(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        for i in range(5):
            await client.add_wifi(f"net{i}", "")
        with pytest.raises(MeterCommandRejected, match="MAX # APs") as info:
            await client.add_wifi("net5", "")
        assert info.value.meter == client.meter_label


async def test_ade9k_read_write(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        before = await client.ade9k_read(0x4B9, 32)
        assert isinstance(before, int)
        reply = await client.ade9k_write(0x4B9, 0x1234, 32)
        assert reply.reg_value == before
        assert await client.ade9k_read(0x4B9, 32) == reply.new_reg_value


async def test_ntp_failure_is_rejected_despite_inverted_flag(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=5.0) as client:
        # the emulator's time server is unreachable here: the meter answers "Error syncing time"
        # with error:false (inverted, §3.7); the client must still raise.
        with pytest.raises(MeterCommandRejected, match="Error syncing time"):
            await client.ntp_sync()
        background = await client.ntp_sync(background=True)
        assert background.succeeded


async def test_probe_and_keepalive(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        await client.probe()
        await client.keepalive()
        await client.probe()  # still in sync after the silent '!'


async def test_codec_rejection_names_meter_and_sends_nothing(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        sent_before = client.last_tx
        with pytest.raises(MeterCommandError, match=r"smartmeter emu .*mdns") as info:
            await client.set_name("x" * 30)
        assert isinstance(info.value, ValueError)
        with pytest.raises(MeterCommandError, match="rate"):
            await client.sample(rate=7)
        assert client.last_tx == sent_before


async def test_busy_and_stop_while_idle(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        with pytest.raises(MeterCommandRejected, match="'stop' rejected"):
            await client.stop()
        session = await client.sample(rate=1000)
        with pytest.raises(MeterBusyError, match="getVoltage") as info:
            await client.get_voltage()
        assert info.value.meter == client.meter_label
        with pytest.raises(MeterBusyError):
            await client.set_calibration([1, 1, 1, 1, 1, 1])  # garbled-echo command, busy reply
        await client.cts(True)  # not busy-checked
        summary = await session.stop()
        assert summary.ended_by == "stop"
        assert (await client.get_voltage()).values


async def test_restart_drops_connection_and_reconnects(meter):
    events = []
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, reconnect_backoff=(0.2, 1.0)
    ) as client:
        client.subscribe_events(events.append)
        boots = meter.boot_count
        await client.restart()
        for _ in range(100):
            if any(type(e).__name__ == "Reconnected" for e in events):
                break
            await asyncio.sleep(0.05)
        kinds = [type(e).__name__ for e in events]
        assert kinds[0] == "ConnectionLost" and events[0].expected
        assert "Reconnected" in kinds
        reconnected = events[kinds.index("Reconnected")]
        assert reconnected.rebooted is True
        assert meter.boot_count == boots + 1
        assert (await client.get_info()).state == "idle"


async def test_factory_and_basic_reset(meter):
    async with AsyncMeterClient(
        "127.0.0.1", meter.command_port, timeout=3.0, reconnect_backoff=(0.2, 1.0)
    ) as client:
        await client.set_name("keepme")
        await client.basic_reset()
        await _wait_connected(client)
        assert client.info.name == "keepme"
        await client.factory_reset()
        await _wait_connected(client)
        assert client.info.name == "smartmeterX"


async def _wait_connected(client: AsyncMeterClient) -> None:
    await asyncio.sleep(0.1)
    for _ in range(100):
        if client.connected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("did not reconnect")


async def test_logs_broadcast_to_all_replies_only_to_requester(meter):
    clients = [await connect(meter) for _ in range(3)]
    try:
        seen: list[list[LogLine]] = [[], [], []]
        for client, bucket in zip(clients, seen, strict=True):
            client.subscribe_logs(bucket.append)
        # malformed input from client 0 -> an ERROR log to everyone (§2.7), no reply
        clients[0]._write(b'{"cmd":oops}\n')  # malformed on purpose: no public API sends it
        for _ in range(60):
            if all(any("deserializeJson" in line.text for line in b) for b in seen):
                break
            await asyncio.sleep(0.05)
        for bucket in seen:
            assert any(
                line.level is LogLevel.ERROR and "deserializeJson() failed" in line.text
                for line in bucket
            )
        voltages = await asyncio.gather(*(c.get_voltage() for c in clients))
        assert all(len(v.values) == 3 for v in voltages)
        assert all(c.unmatched_replies == 0 for c in clients)
    finally:
        for client in clients:
            await client.close()


async def test_async_log_iterator(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        lines = client.logs()
        line = await asyncio.wait_for(lines.__anext__(), 3.0)  # lifeness line within ~1 s
        assert isinstance(line, LogLine) and line.level is LogLevel.INFO
        await lines.aclose()


async def test_ntp_success_with_inverted_flag_and_log(synced_meter):
    async with AsyncMeterClient("127.0.0.1", synced_meter.command_port, timeout=3.0) as client:
        lines = []
        client.subscribe_logs(lines.append)
        reply = await client.ntp_sync()  # the firmware says error:true on success (§3.7)
        assert reply.succeeded and reply.message == "Time synced"
        assert any(line.text.startswith("NTP synced with conf: ") for line in lines)
        reply = await client.set_time_server("127.0.0.1")
        assert reply.value == "127.0.0.1"


async def test_generic_request_with_codec_commands(meter):
    from smartmeter_ophyd.protocol import GetPeriod, Info, Sample, SetLogLevel

    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        assert isinstance(await client.request(Info()), DeviceInfo)
        frequency = await client.request(GetPeriod())
        assert isinstance(frequency, LineValues) and frequency.unit == "Hz"
        await client.request(SetLogLevel(LogLevel.DEBUG))
        with pytest.raises(MeterCommandError, match="sample()"):
            await client.request(Sample(rate=1000))


async def test_sample_transports_this_connection_cannot_receive(meter):
    async with AsyncMeterClient("127.0.0.1", meter.command_port, timeout=3.0) as client:
        with pytest.raises(MeterCommandError, match="MQTT"):
            await client.sample(transport="MQTT", rate=1)
        with pytest.raises(MeterCommandError, match="serial"):
            await client.sample(transport="Serial", rate=1000)
        with pytest.raises(MeterCommandError, match="transport='Carrier pigeon'"):
            await client.sample(transport="Carrier pigeon", rate=1000)
        assert (await client.get_info()).state == "idle"
        with pytest.raises(MeterCommandError, match="prefix=False"):
            await client.sample(rate=1000, prefix=False)
