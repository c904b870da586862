"""ffmpeg records the port-54322 raw stream as the README shows (§7.1, §11 #17)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from smartmeter_ophyd.emulator import EmulatedMeter

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


async def test_ffmpeg_records_two_seconds_of_50hz(meter: EmulatedMeter, tmp_path: Path) -> None:
    """`ffmpeg -f f32le -ar 8000 -ac 6 -i tcp://…:<stream port> -t 2` gets 16000 samples of a
    50 Hz waveform."""
    out = tmp_path / "out.raw"
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
        "-f", "f32le", "-ar", "8000", "-ac", "6",
        "-i", f"tcp://127.0.0.1:{meter.stream_port}",
        "-t", "2", "-f", "f32le", "-y", str(out),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    values = np.fromfile(out, dtype="<f4").reshape(-1, 6)
    assert len(values) == 16000
    v1 = values[:, 0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(v1 - v1.mean()))
    freqs = np.fft.rfftfreq(len(v1), 1 / 8000)
    assert abs(freqs[np.argmax(spectrum)] - 50.0) < 1.0
    assert 300 < np.abs(v1).max() < 360  # 230 V rms ≈ 325 V peak
