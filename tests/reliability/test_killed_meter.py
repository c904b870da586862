"""The meter's process killed (SIGKILL) mid-run and the emulator restarted on the same port
(issue 9, fault matrix).

The emulator runs as its own process (``python -m smartmeter_ophyd.emulator``) with a
control channel for ground truth.  Its main loop is stalled just before the kill, so the
truth read then is final: what it sent before it died.  With ``on_fault="fail"`` the run
fails naming the meter; with ``on_fault="continue"`` the plan waits for the restarted meter
and records the rest as a new segment.  Either way every sample sent is recorded or declared.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import plans
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.readback import meter_rows

from ._support import run_summary, when_sampling

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free TCP ports (the emulator wants command and stream ports in a row)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for port in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no consecutive free ports")


class EmulatorProcess:
    """One emulated meter in a child process, restartable on the same ports and state."""

    def __init__(self, state_dir: Path, ntp: tuple[str, int]) -> None:
        self.command_port, _, self.control_port = free_ports(3)
        self.args = [sys.executable, "-m", "smartmeter_ophyd.emulator",
                     "--base-port", str(self.command_port),
                     "--control-port", str(self.control_port), "--state-dir", str(state_dir),
                     "--time-server", ntp[0], "--ntp-port", str(ntp[1]), "--no-serial",
                     "--boot-delay", "0.05", "--name-prefix", "killed", "--stream-server-port", "9"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.control("status")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the emulator did not start")

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as conn:
            conn.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            answer = conn.makefile("rb").readline()
        reply = json.loads(answer)
        assert reply["ok"], reply
        return reply

    def kill(self) -> dict[str, Any]:
        """Stall the meter's loop (nothing more is sent), read the truth, SIGKILL it."""
        self.control("stall", seconds=30)
        time.sleep(0.3)  # what was in flight arrives
        truth = self.control("truth")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return truth

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def emulator(tmp_path, ntp_server) -> Iterator[EmulatorProcess]:
    process = EmulatorProcess(tmp_path / "state", ntp_server)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def meter(emulator, embedded_catalog) -> Iterator[SmartMeter]:
    device = SmartMeter("127.0.0.1", emulator.command_port, name="m1",
                        data_directory=embedded_catalog.data_directory, timeout=3.0)
    yield device
    device.destroy()


def test_a_killed_meter_fails_the_run_naming_it_with_every_sample_it_sent(
    emulator, meter, engine, embedded_catalog
) -> None:
    killed: list[dict[str, Any]] = []
    thread = when_sampling(engine, lambda: killed.append(emulator.kill()))
    with pytest.raises(Exception, match="connection lost") as info:
        engine.RE(plans.synchronized_fly([meter], 5.0))
    thread.join(20)
    assert meter.meter_label in str(info.value)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "fail" and meter.meter_label in stop["reason"]
    summary = run_summary(embedded_catalog.client[stop["run_start"]], meter)
    (truth,) = killed
    assert summary["received_samples"] + summary["missing_samples"] == truth["sent_samples"] > 0


def test_continue_records_a_new_segment_once_the_killed_meter_is_restarted(
    emulator, meter, engine, embedded_catalog
) -> None:
    killed: list[dict[str, Any]] = []

    def kill_and_restart() -> None:
        killed.append(emulator.kill())
        time.sleep(1.0)
        emulator.start()

    thread = when_sampling(engine, kill_and_restart)
    (uid,) = engine.RE(plans.synchronized_fly([meter], 3.0, on_fault="continue"))
    thread.join(30)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success", stop
    run = embedded_catalog.client[uid]
    rows = meter_rows(run["meter_summary"].read())["m1"]  # one row per segment
    received = [row["received_samples"] for row in rows]
    missing = [row["missing_samples"] for row in rows]
    assert [row["segment"] for row in meter_rows(run["synchronization"].read())["m1"]] == [0, 1]
    assert [row["segment"] for row in rows] == [0, 1]
    (truth,) = killed
    assert received[0] + missing[0] == truth["sent_samples"] > 0
    assert received[1] + missing[1] == emulator.control("truth")["sent_samples"] > 0
    assert not emulator.control("truth")["active"]
