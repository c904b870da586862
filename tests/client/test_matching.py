"""Request/reply matching against verbatim firmware bytes (protocol.md §2.8, §2.9, §3, §12)."""

from __future__ import annotations

import asyncio

import pytest

from smartmeter_ophyd.client import AsyncMeterClient, MeterBusyError, MeterCommandRejected

from .client_fakes import INFO_LINE, FakePeer, cmd_of

LOG_OTHER = b"Info:[I]03/02 10:42:24: Client with IP 192.168.0.7 connected on port 51234\r\n"
LIFENESS = b"Info:[I]03/02 10:42:25: \r\n"


def script(replies: dict[str, list[bytes]]):
    def answer(line: bytes) -> list[bytes]:
        return replies.get(cmd_of(line), [])

    return answer


async def test_logs_interleaved_and_swapped_replies():
    voltage = b'Info:{"error":false,"cmd":"getVoltage","voltage":[230.1,229.8,231.0],"unit":"V"}\r\n'
    current = b'Info:{"error":false,"cmd":"getCurrent","current":[1000.5,20.25,300],"unit":"mA"}\r\n'
    pending: list[bytes] = []

    def answer(line: bytes) -> list[bytes]:
        # hold getVoltage's reply back until getCurrent arrived, then answer in swapped order
        pending.append(line)
        if len(pending) < 2:
            return [LOG_OTHER]
        return [LIFENESS, current, LOG_OTHER, voltage]

    peer = await FakePeer(INFO_LINE, answer).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0) as client:
            logs = []
            client.subscribe_logs(logs.append)
            v, c = await asyncio.gather(client.get_voltage(), client.get_current())
            assert v.values == (230.1, 229.8, 231.0)
            assert c.values == (1000.5, 20.25, 300.0)
            assert len(logs) == 3 and logs[0].text.startswith("Client with IP")
            assert client.unmatched_replies == 0
    finally:
        await peer.close()


async def test_garbled_echo_replies_are_matched():
    calibration = (
        b'Info:{"error":false,"cmd":"v1:1.00, i1:1.00, v2","msg":"Calibration set: v1:1.00, '
        b'i1:1.00, v2:1.00, i2:1.00, v3:1.00, i3:1.00"}\r\n'
    )
    daily = b'Info:{"error":false,"cmd":"y restart to: 03:15:00","msg":"Set daily restart to: 03:15:00"}\r\n'
    ade = b'Info:{"error":false,"cmd":"x04b9, Read: 0x","msg":"Addr: 0x04b9, Read: 0x1234","regValue":4660}\r\n'
    getlog = [
        b'Info:{"cmd":"log","msg":"*** LOGFile *** //nInfo:[W]03/02 11:26:20: "quoted" warn//n'
        b'03/02 11:00:00: Reboot - inited SPIFFS Logger//n*** LOGFile *** "}\r\n',
        b'Info:{"error":false,"cmd":"Reboot - inited SPIF"}\r\n',
    ]
    peer = await FakePeer(
        INFO_LINE,
        script({"calibration": [LOG_OTHER, calibration], "dailyRestart": [daily],
                "ade9k": [ade], "getLog": getlog}),
    ).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0) as client:
            cal, day, reg, rows = await asyncio.gather(
                client.set_calibration([1] * 6),
                client.set_daily_restart(3, 15),
                client.ade9k_read(0x4B9),
                client.get_log(),
            )
            assert cal.message.startswith("Calibration set")
            assert day.message == "Set daily restart to: 03:15:00"
            assert reg == 0x1234
            assert rows == [
                'Info:[W]03/02 11:26:20: "quoted" warn',
                "03/02 11:00:00: Reboot - inited SPIFFS Logger",
            ]
    finally:
        await peer.close()


async def test_inverted_flags_busy_and_stop_order():
    ntp_ok = b'Info:{"error":true,"cmd":"ntp","msg":"Time synced","current_time":"03/02/2021 10:42:24.120"}\r\n'
    busy = (
        b'Info:{"error":true,"cmd":"getPower","msg":"Device with IP: 192.168.0.138 currently '
        b'sampling","state":"busy"}\r\n'
    )
    unknown_level = b'Info:{"error":true,"cmd":"log","msg":"Unknown log level: loud"}\r\n'
    peer = await FakePeer(
        INFO_LINE, script({"ntp": [ntp_ok], "getPower": [busy], "log": [unknown_level]})
    ).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0) as client:
            ntp = await client.ntp_sync()
            assert ntp.succeeded and ntp.current_time.startswith("03/02/2021")
            with pytest.raises(MeterBusyError, match="currently sampling"):
                await client.get_power()
            with pytest.raises(MeterCommandRejected, match="Unknown log level: loud"):
                await client.set_log_level("error")
    finally:
        await peer.close()


async def test_sample_reply_and_frames_in_one_segment_then_stop():
    """Appendix B: the sample reply and the first frames arrive together; stop's error is last."""
    import numpy as np

    from smartmeter_ophyd.protocol import encode_frames

    values = np.arange(42 * 6 * 3, dtype=np.float32).reshape(-1, 6)
    sample = (
        b'Info:{"error":false,"cmd":"sample","measures":"v,i,v,i,v,i","chunksize":1008,'
        b'"samplingrate":4000,"conn_type":"TCP","measurements":6,"prefix":true,"flowCtr":false,'
        b'"unit":"V,mA,V,mA,V,mA","startTs":"1614677828.512"}\r\n'
    )
    stop = (
        b'Info:{"msg":"Received stop command","sample_duration":2043,"samples":126,'
        b'"sent_samples":126,"start_ts":"1614677828.512","stop_ts":"1614677830.555",'
        b'"ip":"192.168.0.138","avg_rate":4000,"cmd":"stop","error":false}\r\n'
    )
    frames = encode_frames(0, values, 42)
    peer = await FakePeer(
        INFO_LINE,
        script({"sample": [sample + frames[:1500]], "stop": [frames[1500:] + LIFENESS[:0] + stop]}),
    ).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0) as client:
            session = await client.sample(rate=4000)
            summary = await session.stop()
            blocks = session.drain_nowait()
            got = np.concatenate([b.values for b in blocks])
            np.testing.assert_array_equal(got, values)
            assert summary.explained and summary.start_ts == 1614677828.512
            assert summary.device_sent_samples == 126 and summary.avg_rate == 4000
    finally:
        await peer.close()


async def test_unsolicited_reply_logged_without_password(caplog):
    stray = (
        b'Info:{"error":true,"cmd":"addWifi","ssid":"lab","pwd":"hunter2","msg":"New Ap, '
        b'SSID: lab, PW: hunter2","ssids":"[lab, ]"}\r\n'
    )
    peer = await FakePeer(INFO_LINE).start()
    try:
        async with AsyncMeterClient("127.0.0.1", peer.port, timeout=2.0) as client:
            peer.push(stray)
            for _ in range(40):
                if client.unmatched_replies:
                    break
                await asyncio.sleep(0.02)
            assert client.unmatched_replies == 1
    finally:
        await peer.close()
    assert "reply nobody waits for" in caplog.text
    assert "hunter2" not in caplog.text
