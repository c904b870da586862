"""Log-text parsers on the firmware's own texts, and live on an emulated meter."""

from __future__ import annotations

import asyncio

from smartmeter_ophyd.client import (
    AsyncMeterClient,
    missed_samples,
    ntp_confidence_ms,
    ntp_offset,
    overflow_lost_samples,
    rate_report,
    sampling_correction,
)
from smartmeter_ophyd.protocol import LogLevel, LogLine


def test_parsers_on_verbatim_texts():
    assert ntp_confidence_ms("NTP synced with conf: 12") == 12
    assert ntp_confidence_ms(LogLine(LogLevel.INFO, "03/02 10:42:24", "NTP synced with conf: 3")) == 3
    assert ntp_confidence_ms("NTP synced with conf: x") is None
    assert sampling_correction("Correcting: -7 samples") == -7
    assert sampling_correction("Correcting: 10 samples") == 10
    assert overflow_lost_samples("Overflow during ringBuffer write, lost 152917 samples") == 152917
    assert missed_samples("MISSED 3 SAMPLES") == 3
    report = rate_report("7999.87Hz, 80000s")
    assert report is not None and report.measured_rate == 7999.87 and report.total_samples == 80000
    offset = ntp_offset("Offset of -0.012 s, SecondInterrupts 61, SamplingDur 61.004")
    assert offset is not None and offset.offset_s == -0.012 and offset.second_interrupts == 61
    for parser in (ntp_confidence_ms, sampling_correction, overflow_lost_samples, rate_report):
        assert parser("") is None  # the lifeness line


async def test_live_rate_report_and_ntp_confidence(synced_meter):
    async with AsyncMeterClient("127.0.0.1", synced_meter.command_port, timeout=3.0) as client:
        lines: list[LogLine] = []
        client.subscribe_logs(lines.append)
        session = await client.sample(rate=1000)
        await client.ntp_sync()  # allowed while sampling (§3.7)
        for _ in range(40):
            if any(rate_report(line) for line in lines):
                break
            await asyncio.sleep(0.05)
        await session.stop()
        reports = [r for r in map(rate_report, lines) if r]
        assert reports and 900 < reports[0].measured_rate < 1100
        confidences = [c for c in map(ntp_confidence_ms, lines) if c is not None]
        assert confidences and all(0 <= c < 200 for c in confidences)
