"""The ``smartmeter`` CLI, every command in a subprocess against emulated meters.

Each test runs ``python -m smartmeter_ophyd.cli`` with a private data directory and Tiled
profile directory (nothing is written to the user's home).  Meters are either started by
``smartmeter record`` itself (no host) or by ``smartmeter emulate`` in another process.
What the CLI prints is checked against what the catalog holds and what the meters report,
never against itself.

Cost: a command that opens the catalog starts Tiled in its process (seconds of CPU), so the
module shares what it can.  One ``smartmeter record`` (the main job) is read by the
``runs``/``plot``/``export``/``rerun`` tests; one ``smartmeter emulate`` process (announced
by mDNS, connected to the project's mosquitto) serves the meter, discovery and MQTT tests;
every command that records writes into the one catalog, so none pays its creation again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PYTHON = sys.executable
pytestmark = pytest.mark.slow

SUBCOMMANDS = ("record", "discover", "info", "get", "set", "read", "ntp", "logs", "emulate",
               "runs", "plot", "export", "rerun")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    return {**os.environ, "SMARTMETER_DATA_DIR": str(root / "data"),
            "TILED_PROFILES": str(root / "profiles"), "PYTHONWARNINGS": "default"}


def run_cli(env: dict[str, str], *args: str, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "smartmeter_ophyd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def no_noise(result: subprocess.CompletedProcess[str]) -> None:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert "Tiled version" not in text, text
    assert "StarletteDeprecationWarning" not in text, text


def printed_uid(stdout: str) -> str:
    """The run uid of a printed summary (its first line is ``run <uid>  <plan> ...``)."""
    line = next(line for line in stdout.splitlines() if line.startswith("run "))
    return line.split()[1]


@pytest.fixture(scope="module")
def recorded(cli_env: dict[str, str]) -> dict[str, Any]:
    """One `smartmeter record` with two emulated meters (the README's main job), and the
    run's summary as ``smartmeter runs RUN --json`` reads it from the catalog afterwards."""
    result = run_cli(cli_env, "record", "--duration", "2", "--rate", "4000")
    assert result.returncode == 0, result.stdout + result.stderr
    uid = printed_uid(result.stdout)
    summary = run_cli(cli_env, "runs", uid[:8], "--json")
    assert summary.returncode == 0, summary.stderr
    no_noise(summary)
    return {"result": result, "summary": json.loads(summary.stdout), "uid": uid}


@pytest.fixture(scope="module")
def emulator(ntp_server: tuple[str, int], mqtt_broker: tuple[str, int],
             tmp_path_factory: pytest.TempPathFactory,
             cli_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """`smartmeter emulate --count 1 --mqtt HOST:PORT` in its own process, timed by the
    project's chrony.  The name is unique: the broker is shared, and MQTT client ids (the
    meter's name, §8.1) must not clash with another test's meter.  Not announced by mDNS:
    the discover test announces its own while it has mDNS to itself (``mdns_exclusive``)."""
    state = tmp_path_factory.mktemp("emulate-state")
    log = state / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [PYTHON, "-m", "smartmeter_ophyd.cli", "emulate", "--count", "1", "--name-prefix",
             f"cli{os.getpid()}_", "--time-server", ntp_server[0], "--ntp-port",
             str(ntp_server[1]), "--state-dir", str(state),
             "--mqtt", f"{mqtt_broker[0]}:{mqtt_broker[1]}"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=cli_env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        assert line, log.read_text()
        deadline = time.monotonic() + 10  # the lines on stderr follow the JSON lines
        while "MQTT broker" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield {**json.loads(line), "stderr": log.read_text()}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0  # Ctrl-C is the normal end of `emulate`
        proc.stdout.close()


def address(meter: dict[str, Any]) -> str:
    return f"{meter['host']}:{meter['command_port']}"


@contextlib.contextmanager
def unsynced_meter(cli_env: dict[str, str], *options: str) -> Iterator[dict[str, Any]]:
    """`smartmeter emulate --count 1 OPTIONS` in its own process, its time server a port
    nothing answers on; the meter's JSON line."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "smartmeter_ophyd.cli", "emulate", "--count", "1",
         "--time-server", "127.0.0.1", "--ntp-port", "9", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


# ------------------------------------------------------------------------------ --help


def test_help_of_every_command_shows_help_and_defaults(cli_env: dict[str, str]) -> None:
    top = run_cli(cli_env, "--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
    for name in SUBCOMMANDS:
        result = run_cli(cli_env, name, "--help")
        assert result.returncode == 0, result.stderr
        options = [line for line in result.stdout.splitlines() if line.strip().startswith("--")]
        assert options, name
        assert "default" in result.stdout, name
        if name == "record":
            assert "(default: 8000)" in result.stdout and "(default: 10.0)" in result.stdout
        if name == "emulate":
            assert "--mqtt HOST[:PORT]" in result.stdout and "1883" in result.stdout


def test_the_installed_program_exits_with_the_commands_status(cli_env: dict[str, str]) -> None:
    """The console script (``[project.scripts]``), not ``python -m``: its status is main's."""
    program = Path(sys.executable).with_name("smartmeter")
    ok = subprocess.run([str(program), "--help"], capture_output=True, text=True, env=cli_env,
                        timeout=60)
    assert ok.returncode == 0 and "smartmeter record" in ok.stdout, ok.stderr
    mistake = subprocess.run([str(program), "record", "--duration", "-1"], capture_output=True,
                             text=True, env=cli_env, timeout=60)
    assert mistake.returncode == 2 and "--duration" in mistake.stderr, mistake.stderr


# ------------------------------------------------------------------------- user mistakes


@pytest.mark.parametrize("args, words", [
    (["record", "--rate", "7000"], ["7000", "32000"]),
    (["record", "--emulate", "0"], ["--emulate", "1..16"]),
    (["record", "--measures", "x,y"], ["measures", "'x,y'"]),
    (["record", "--duration", "-1"], ["--duration", "positive"]),
    (["record", "127.0.0.1:notaport"], ["notaport"]),
    (["set", "127.0.0.1:9", "--calibration", "1,1,3,1,1,1"], ["calibration", "0.5..2.0"]),
    (["plot", "-1", "--data-dir", "/nonexistent/smartmeter"], ["no catalog"]),
    (["emulate", "--mqtt", "broker:x"], ["--mqtt", "'x'"]),
])
def test_mistakes_are_one_line_exit_2_before_any_meter(cli_env: dict[str, str], args: list[str],
                                                       words: list[str]) -> None:
    t0 = time.monotonic()
    result = run_cli(cli_env, *args)
    elapsed = time.monotonic() - t0
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "starting" not in result.stderr and "connecting" not in result.stderr
    assert elapsed < 30  # the plan's checks run, no emulator starts, no meter is contacted
    no_noise(result)


def test_unreachable_meter_is_one_line_naming_it(cli_env: dict[str, str]) -> None:
    result = run_cli(cli_env, "info", "127.0.0.1:9", "--timeout", "1")
    assert result.returncode == 1
    assert "127.0.0.1:9" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- the main job


def test_record_with_no_host_records_emulated_meters(recorded: dict[str, Any]) -> None:
    result, summary = recorded["result"], recorded["summary"]
    no_noise(result)
    out = result.stdout
    assert summary["uid"] == recorded["uid"]
    assert summary["plan"] == "synchronized_fly" and summary["exit_status"] == "success"
    assert sorted(summary["meters"]) == ["meter1", "meter2"]
    for name, row in summary["meters"].items():
        assert row["emulated"]
        # the table prints what the catalog holds: samples, what the meter sent, gaps, NTP
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert str(row["samples"]) in line and str(row["meter_sent"]) in line
        assert row["samples"] >= 8000 and row["samples"] == row["meter_sent"]
        assert row["explained"] and 0 <= row["ntp_gate_ms"] <= 5
    assert "start spread" in out and "alignment residual" in out
    pngs = [Path(line.split("plot: ", 1)[1]) for line in out.splitlines()
            if line.startswith("plot: ")]
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "recording 2 meter(s)" in result.stderr  # announced when the bars appear
    assert "meter1" in result.stderr and "samples" in result.stderr  # the progress bars


def test_ctrl_c_aborts_the_run_and_prints_the_summary(cli_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "smartmeter_ophyd.cli", "record", "--until-stopped", "--emulate", "1",
         "--no-plots"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if line.startswith("recording"):
            break
    else:
        proc.kill()
        pytest.fail("record never started: " + "".join(seen))
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    err = "".join(seen) + err
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert "exit status: abort" in out
    uid = printed_uid(out)
    printed = next(line for line in out.splitlines() if line.startswith("meter1")).split()
    # the catalog, read here (not by the CLI): the run is closed as aborted, the meter was
    # stopped (its stop reply's count is recorded) and everything it sent is stored
    with catalog_reader(cli_env, tmp_path) as client:
        run = client[uid]
        assert run.stop["exit_status"] == "abort"
        stored = run["meter1"]["meter1_v_l1"].shape[0]
        from smartmeter_ophyd.readback import meter_rows

        (row,) = meter_rows(run["meter_summary"].read())["meter1"]
        sent = row["device_sent_samples"]
        assert stored == sent > 0
        assert row["explained"] is True
    assert printed[2:4] == [str(stored), str(sent)]  # "meter1 (emulated) <samples> <sent>"


@contextlib.contextmanager
def catalog_reader(env: dict[str, str], directory: Path) -> Iterator[Any]:
    """The CLI's embedded catalog opened in this process (through a Tiled profile of its own
    in ``directory``)."""
    from smartmeter_ophyd.storage import setup_embedded_catalog

    catalog = setup_embedded_catalog(Path(env["SMARTMETER_DATA_DIR"]) / "catalog",
                                     profile=f"cli-test-{os.getpid()}",
                                     profiles_dir=directory / "profiles")
    try:
        yield catalog.client
    finally:
        catalog.close()


def test_meter_without_time_server_is_refused_with_advice(cli_env: dict[str, str]) -> None:
    with unsynced_meter(cli_env) as meter:
        result = run_cli(cli_env, "record", address(meter), "--duration", "1",
                         "--ntp-attempts", "1", "--no-plots")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--time-server" in result.stderr and address(meter) in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------- meter commands


def test_info_and_get_agree_with_the_meter(emulator: dict[str, Any],
                                           cli_env: dict[str, str],
                                           mqtt_broker: tuple[str, int]) -> None:
    info = run_cli(cli_env, "info", address(emulator), "--json")
    assert info.returncode == 0, info.stderr
    raw = json.loads(info.stdout)
    assert raw["name"] == emulator["name"] and raw["version"] == "2.2"
    assert list(raw)[:3] == ["cmd", "type", "version"]  # firmware key order (§2.5)
    got = json.loads(run_cli(cli_env, "get", address(emulator), "--json").stdout)
    assert got["name"] == raw["name"] and got["time_server"] == raw["time_server"]
    assert got["calibration"] == raw["calibration"]
    assert got["mqtt_server"] == mqtt_broker[0]  # what `emulate --mqtt` stored (§3.3)
    text = run_cli(cli_env, "get", address(emulator), "--setting", "name").stdout
    assert text.split(":", 1)[1].strip() == raw["name"]


def test_set_changes_settings_and_says_what_changed(emulator: dict[str, Any],
                                                    cli_env: dict[str, str]) -> None:
    before = json.loads(run_cli(cli_env, "get", address(emulator), "--json").stdout)
    result = run_cli(cli_env, "set", address(emulator), "--calibration", "1,1,1.1,1,1,0.9",
                     "--daily-restart", "3:15")
    assert result.returncode == 0, result.stderr
    assert "calibration:" in result.stdout and "-> 1,1,1.1,1,1,0.9 (changed" in result.stdout
    after = json.loads(run_cli(cli_env, "get", address(emulator), "--json").stdout)
    assert after["calibration"] == [1, 1, 1.1, 1, 1, 0.9] != before["calibration"]
    assert after["daily_restart"] == [3, 15]


def test_read_and_ntp(emulator: dict[str, Any], cli_env: dict[str, str]) -> None:
    reading = json.loads(run_cli(cli_env, "read", address(emulator), "--json").stdout)
    assert all(200 < v < 260 for v in reading["voltage_V"])
    assert all(49.5 < f < 50.5 for f in reading["frequency_Hz"])
    ntp = run_cli(cli_env, "ntp", address(emulator), "--json")
    assert ntp.returncode == 0, ntp.stderr
    synced = json.loads(ntp.stdout)
    assert synced["synced"] and synced["confidence_ms"] is not None


def test_output_into_a_closed_pipe_is_not_an_error(emulator: dict[str, Any],
                                                   cli_env: dict[str, str]) -> None:
    result = subprocess.run(
        f"{PYTHON} -m smartmeter_ophyd.cli info {address(emulator)} --json | head -1",
        shell=True, capture_output=True, text=True, timeout=60, env=cli_env)
    assert result.stdout.strip() == "{"
    assert "Traceback" not in result.stderr


def test_discover_finds_the_emulated_meter_on_loopback(mdns_exclusive: None,
                                                       cli_env: dict[str, str]) -> None:
    with unsynced_meter(cli_env, "--name-prefix", f"mdns{os.getpid()}_", "--mdns") as meter:
        result = run_cli(cli_env, "discover", "--interface", "127.0.0.1", "--timeout", "2",
                         "--json")
    assert result.returncode == 0, result.stderr
    found = [m for m in json.loads(result.stdout) if m["name"] == meter["name"]]
    assert len(found) == 1
    assert found[0]["command_port"] == meter["command_port"]
    assert found[0]["address"] == "127.0.0.1"


def test_emulate_mqtt_answers_on_the_broker(emulator: dict[str, Any],
                                            mqtt_broker: tuple[str, int]) -> None:
    """`emulate --mqtt`: the meter is on the real broker and answers its topics (§8.2)."""
    from tests.mqtt_tools import Probe

    assert emulator["mqtt"] == f"{mqtt_broker[0]}:{mqtt_broker[1]}"
    assert emulator["mqtt_connected"] is True
    assert f"MQTT broker {emulator['mqtt']}: all meters connected" in emulator["stderr"]
    base = f"powermeter/{emulator['name']}"

    async def ask() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Probe(*mqtt_broker, topic=f"{base}/#") as probe:
            replies = []
            for topic, payload in ((f"{base}/state", ""), (f"{base}/sample", "v")):
                mark = len(probe.messages)
                await probe.publish(topic, payload)
                message = await probe.wait(lambda m: m.topic == f"{base}/state/info",
                                           timeout=5, since=mark)
                replies.append(json.loads(message.text))
            return replies[0], replies[1]

    state, voltage = asyncio.run(ask())
    assert state["sampleState"] == "idle"
    assert voltage["unit"] == "V"
    assert all(200 < float(v) < 260 for v in voltage["value"].split(","))


# ------------------------------------------------------------------------------ run commands


def test_runs_lists_the_recorded_run(recorded: dict[str, Any], cli_env: dict[str, str]) -> None:
    result = run_cli(cli_env, "runs")
    assert result.returncode == 0
    no_noise(result)
    line = next(line for line in result.stdout.splitlines()
                if line.startswith(recorded["uid"][:8]))
    assert "synchronized_fly" in line and "success" in line and "meter1,meter2" in line


def test_plot_refuses_to_overwrite_then_replaces(recorded: dict[str, Any],
                                                 cli_env: dict[str, str]) -> None:
    uid = recorded["uid"][:8]
    plots = Path(cli_env["SMARTMETER_DATA_DIR"]) / "plots"
    made = {p: p.stat().st_mtime_ns for p in plots.iterdir() if p.name.startswith(uid)}
    # the record wrote them: `plot` into the same place must not replace them silently
    assert sorted(p.name for p in made) == [f"{uid}-first-cycles.png", f"{uid}-rms.png"]
    again = run_cli(cli_env, "plot", uid)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in made} == made
    replaced = run_cli(cli_env, "plot", uid, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    no_noise(replaced)
    assert sorted(Path(line.split("plot: ", 1)[1]) for line in replaced.stdout.splitlines()
                  ) == sorted(made)
    for png, before in made.items():
        assert png.stat().st_mtime_ns > before
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_export_writes_every_meter_and_refuses_to_overwrite(recorded: dict[str, Any],
                                                            cli_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    uid = recorded["uid"][:8]
    result = run_cli(cli_env, "export", uid, "--format", "csv", "--power-summary", "parquet",
                     "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"{uid}-meter1.csv", f"{uid}-meter2.csv",
                            f"{uid}-meter1-power-1s.parquet", f"{uid}-meter2-power-1s.parquet"])
    for name in ("meter1", "meter2"):
        with open(tmp_path / f"{uid}-{name}.csv") as csv:
            rows = sum(1 for _ in csv) - 1
        assert rows == recorded["summary"]["meters"][name]["samples"]
    again = run_cli(cli_env, "export", uid, "--format", "csv", "--output-dir", str(tmp_path))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_rerun_repeats_the_run(recorded: dict[str, Any], cli_env: dict[str, str],
                              tmp_path: Path) -> None:
    original = recorded["summary"]
    result = run_cli(cli_env, "rerun", original["uid"][:8], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    no_noise(result)
    assert f"rerun of {original['uid']}" in result.stdout
    with catalog_reader(cli_env, tmp_path) as client:
        old, new = client[original["uid"]], client[printed_uid(result.stdout)]
        assert new.start["rerun_of"] == original["uid"]
        assert new.start["plan_name"] == old.start["plan_name"] == "synchronized_fly"
        assert new.start["plan_args"] == old.start["plan_args"]
        assert new.start["detectors"] == old.start["detectors"]
        assert new.stop["exit_status"] == "success"
        for name in old.start["detectors"]:  # the emulated meters were emulated again
            assert new.start["meters"][name]["emulated"] is True
            assert new[name][f"{name}_v_l1"].shape[0] >= 8000
