"""The ``smartmeter`` CLI against an emulator running in its own process (real sockets).

The emulator synchronises with the project's chrony (``ntp_server``), so the recorded
start timestamp is a real NTP-derived time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from smartmeter_ophyd.cli.__main__ import main

PYTHON = sys.executable


@pytest.fixture(scope="module")
def emulator(ntp_server: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, object]]:
    host, port = ntp_server
    state = tmp_path_factory.mktemp("cli-emulator")
    proc = subprocess.Popen(
        [PYTHON, "-m", "smartmeter_ophyd.emulator", "--count", "1", "--base-port", "0",
         "--name-prefix", "cli", "--state-dir", str(state), "--no-serial",
         "--time-server", host, "--ntp-port", str(port)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        assert line, "emulator printed nothing"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(10)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "smartmeter_ophyd.cli", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def address(emulator: dict[str, object]) -> str:
    return f"{emulator['host']}:{emulator['command_port']}"


def test_info_prints_the_meters_info_message(emulator: dict[str, object]) -> None:
    result = run_cli("info", address(emulator))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["name"] == emulator["name"]
    assert info["type"] == "smartmeter" and info["version"] == "2.2"
    assert list(info)[:3] == ["cmd", "type", "version"]  # firmware key order (§2.5)


def test_read_prints_plausible_mains_values(emulator: dict[str, object]) -> None:
    result = run_cli("read", address(emulator))
    assert result.returncode == 0, result.stderr
    lines = {line.split(":")[0].strip(): line.split(":")[1].split() for line in
             result.stdout.splitlines()}
    volts = [float(v) for v in lines["voltage"][:3]]
    hertz = [float(v) for v in lines["frequency"][:3]]
    assert all(200 < v < 260 for v in volts), volts
    assert all(49.5 < f < 50.5 for f in hertz), hertz


def test_record_writes_every_sample_the_meter_sent(emulator: dict[str, object],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    result = run_cli("record", address(emulator), "-o", str(out), "--seconds", "1",
                     "--rate", "4000")
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out, "r") as f:
        summary = json.loads(f.attrs["stop_summary"]) if "stop_summary" in f.attrs else None
        v1 = f["v_l1"][:]
        t = f["time"][:]
        identity = {key: f.attrs[key] for key in ("firmware", "compiled", "sampling_reply")}
    assert identity["firmware"] == "2.2" and identity["compiled"]
    assert json.loads(identity["sampling_reply"])["cmd"] == "sample"
    assert v1.shape[0] >= 4000
    assert summary is not None and summary["device_sent_samples"] == v1.shape[0]
    assert np.allclose(np.diff(t), 1 / 4000, rtol=0, atol=1e-6)  # float64 at ~1.8e9 s
    spectrum = np.abs(np.fft.rfft(v1[:4000] - v1[:4000].mean()))
    assert abs(np.argmax(spectrum) * 4000 / 4000 - 50) <= 1  # 1 Hz bins


def test_set_and_ntp(emulator: dict[str, object]) -> None:
    result = run_cli("set", address(emulator), "--calibration", "1", "1", "1.1", "1", "1", "0.9")
    assert result.returncode == 0, result.stderr
    info = json.loads(run_cli("info", address(emulator)).stdout)
    assert info["calibration"] == [1, 1, 1.1, 1, 1, 0.9]
    result = run_cli("ntp", address(emulator))
    assert result.returncode == 0, result.stderr
    assert "Time synced" in result.stdout and "confidence" in result.stdout


def test_bad_input_is_refused_before_the_meter_is_touched(emulator: dict[str, object]) -> None:
    result = run_cli("set", address(emulator), "--calibration", "1", "1", "3", "1", "1", "1")
    assert result.returncode != 0
    assert "0.5" in result.stderr and "2.0" in result.stderr
    info = json.loads(run_cli("info", address(emulator)).stdout)
    assert 3 not in info["calibration"]


def test_unreachable_meter_names_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    threads = set(threading.enumerate())
    assert main(["info", "127.0.0.1:9", "--timeout", "1"]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert set(threading.enumerate()) <= threads  # the client's loop thread was joined


def test_output_into_a_closed_pipe_is_not_an_error(emulator: dict[str, object]) -> None:
    result = subprocess.run(
        f"{PYTHON} -m smartmeter_ophyd.cli info {address(emulator)} | head -1",
        shell=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "{"
    assert "Traceback" not in result.stderr
