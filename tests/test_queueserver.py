"""bluesky-queueserver on ``smartmeter_ophyd.queueserver``: a real ``start-re-manager`` with
the Redis that ``scripts/services.sh`` starts, emulated meters timed by the project's chrony,
and ``synchronized_fly`` queued with ``qserver``.  The run must land in the catalog (written
by the worker's journal sink and its writer process), and closing the environment must stop
that writer and leave no journal behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _read_env_file, _run_services, _unavailable

pytestmark = [pytest.mark.slow, pytest.mark.service]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def redis(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The Redis of ``scripts/services.sh`` (a private one if the shared set has none)."""
    port = services.values.get("SMARTMETER_REDIS_PORT")
    host = services.values.get("SMARTMETER_REDIS_HOST", "127.0.0.1")
    if port and _answers(host, int(port)):
        yield host, int(port)
        return
    run_dir = tmp_path_factory.mktemp("redis")
    started = _run_services("start", "redis", run_dir=run_dir)
    try:
        values = _read_env_file(run_dir / "services.env") if started.returncode == 0 else {}
        if not values.get("SMARTMETER_REDIS_PORT"):
            _unavailable(f"redis unavailable (Debian package redis-server): {started.stdout}"
                         f"{started.stderr}")
        yield values["SMARTMETER_REDIS_HOST"], int(values["SMARTMETER_REDIS_PORT"])
    finally:
        _run_services("stop", run_dir=run_dir)


class Manager:
    """A running ``start-re-manager`` and the ``qserver`` commands that talk to it."""

    def __init__(self, proc: subprocess.Popen[str], control: str, env: dict[str, str]) -> None:
        self.proc = proc
        self.control = control
        self.env = env

    def request(self, method: str, params: dict[str, Any] | None = None,
                timeout_s: float = 10.0) -> dict[str, Any]:
        """One request on the manager's control socket (0MQ REQ, JSON: what ``qserver`` and
        bluesky-queueserver's ``ZMQCommSendThreads`` send); its context is closed after."""
        import zmq

        context = zmq.Context()
        socket_ = context.socket(zmq.REQ)
        try:
            socket_.setsockopt(zmq.LINGER, 0)
            socket_.connect(self.control)
            socket_.send_json({"method": method, "params": params or {}})
            if not socket_.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"queue server: no reply to {method!r} in {timeout_s:g} s")
            reply: dict[str, Any] = socket_.recv_json()  # type: ignore[assignment]
            return reply
        finally:
            socket_.close()
            context.term()

    def qserver(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "qserver"), *args], capture_output=True, text=True,
                                timeout=60, env=self.env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def wait_for(self, what: str, check: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.request("status")
            if check(status):
                return status
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"queue server: {what} not reached in {timeout:g} s; last status {status}")


@pytest.fixture(scope="module")
def manager(redis: tuple[str, int], ntp_server: tuple[str, int],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Manager, Any, Path]]:
    import bluesky_queueserver

    from smartmeter_ophyd.emulator import EmulatorFleet

    root = tmp_path_factory.mktemp("queueserver")
    fleet = EmulatorFleet(2, name_prefix="qs", time_server=ntp_server[0],
                          ntp_port=ntp_server[1]).start()
    sample = Path(bluesky_queueserver.__file__).parent / "profile_collection_sim"
    shutil.copy(sample / "user_group_permissions.yaml", root / "permissions.yaml")
    control = f"tcp://127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "SMARTMETER_QS_METERS": ",".join(f"{n}={h}:{p}" for n, (h, p)
                                         in zip(fleet.names, fleet.addresses, strict=True)),
        "SMARTMETER_QS_EMULATED": "1",
        "SMARTMETER_DATA_DIR": str(root / "data"),
        "TILED_PROFILES": str(root / "profiles"),
        "QSERVER_ZMQ_CONTROL_ADDRESS": control,
    }
    log = open(root / "manager.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "start-re-manager"), "--startup-module", "smartmeter_ophyd.queueserver",
         "--existing-plans-devices", str(root / "existing_plans_and_devices.yaml"),
         "--update-existing-plans-devices", "ENVIRONMENT_OPEN",
         "--user-group-permissions", str(root / "permissions.yaml"),
         "--redis-addr", f"{redis[0]}:{redis[1]}",
         "--redis-name-prefix", f"smartmeter_test_{os.getpid()}",
         "--zmq-control-addr", control,
         "--zmq-info-addr", f"tcp://127.0.0.1:{_free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    qs = Manager(proc, control, env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                qs.request("status")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("start-re-manager did not answer:\n"
                                + (root / "manager.log").read_text()[-3000:])
                time.sleep(0.5)
        yield qs, fleet, root
    finally:
        try:
            qs.request("environment_close")
            qs.wait_for("environment closed",
                        lambda s: not s.get("worker_environment_exists"), 60)
            qs.request("manager_stop", {"option": "safe_off"})
            proc.wait(30)
        except Exception:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        fleet.close()


def test_synchronized_fly_through_the_queue_lands_in_the_catalog(manager: Any) -> None:
    qs, fleet, root = manager
    qs.qserver("environment", "open")
    qs.wait_for("worker environment", lambda s: s.get("worker_environment_exists")
                and s.get("manager_state") == "idle", 120)

    allowed = qs.request("plans_allowed", {"user_group": "primary"})["plans_allowed"]
    fly = allowed["synchronized_fly"]["parameters"]
    meters = next(p for p in fly if p["name"] == "meters")
    assert set(meters["annotation"]["devices"]["Meters"]) == set(fleet.names)
    assert "rerun" in allowed and "monitor" in allowed

    plan = {"name": "synchronized_fly", "args": [fleet.names, 1.0],
            "kwargs": {"rate": 4000, "md": {"via": "queueserver"}}}
    qs.qserver("queue", "add", "plan", json.dumps(plan))
    qs.qserver("queue", "start")
    qs.wait_for("plan done", lambda s: s.get("items_in_history", 0) >= 1
                and s.get("manager_state") == "idle", 180)
    history = qs.request("history_get")["items"]
    result = history[-1]["result"]
    assert result["exit_status"] == "completed", result
    (uid,) = result["run_uids"]

    from smartmeter_ophyd.storage import setup_embedded_catalog

    catalog = setup_embedded_catalog(root / "data" / "catalog", profile=f"qs-read-{os.getpid()}",
                                     profiles_dir=root / "read-profiles")
    check_run(catalog, uid, fleet.names)

    # the worker's sink closes with the environment: its writer finished and stopped, and
    # no journal (no document left unwritten) nor session directory stays behind
    journals = root / "data" / "catalog" / "journal"
    assert journals.is_dir()
    qs.qserver("environment", "close")
    qs.wait_for("environment closed", lambda s: not s.get("worker_environment_exists"), 60)
    deadline = time.monotonic() + 30
    while list(journals.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(journals.iterdir()) == []


def check_run(catalog: Any, uid: str, names: list[str]) -> None:
    from smartmeter_ophyd.readback import meter_rows

    try:
        run = catalog.client[uid]
        assert run.start["plan_name"] == "synchronized_fly"
        assert run.start["via"] == "queueserver"
        assert run.stop["exit_status"] == "success"
        summary = meter_rows(run["meter_summary"].read())
        for name in names:
            assert run.start["meters"][name]["emulated"] is True
            samples = run[name][f"{name}_v_l1"].shape[0]
            # the meter's own count of what it sent is the truth for what must be stored
            (row,) = summary[name]
            sent = row["device_sent_samples"]
            assert samples == sent >= 4000
    finally:
        catalog.close()
