"""Project-wide fixtures: the local services started by ``scripts/services.sh``.

``services`` reads the env file written by ``scripts/services.sh start``
(``$SMARTMETER_SERVICES_ENV``, default ``var/run/services.env``).  If those services are not
running, it starts a private set (chrony and mosquitto only) in a temporary directory and
stops it at the end of the session.  ``ntp_server`` and ``mqtt_broker`` give ``(host, port)``.

A test whose service is unavailable fails with the Debian package to install when ``CI`` is
set, and is skipped with that reason otherwise.  Area fixtures live in the areas' own
conftest.py files.

Every test runs under the leak guard (``tests/leak_guard.py``, registered here as a plugin):
no thread, asyncio task or TCP/UDP socket it started may outlive it and its fixtures.
Tests make run engines with ``tests.run_engines.RunEngine``; ``close_run_engines`` stops
their loop threads after the test's fixtures, before the guard looks.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import dask
import pytest

from tests import run_engines

pytest_plugins = ["tests.leak_guard"]

# Tiled reads arrays through dask, whose threaded scheduler keeps a thread pool per calling
# thread until the process exits (dask/threaded.py): the leak guard cannot tell those threads
# from leaks.  The synchronous scheduler computes in the calling thread.
dask.config.set(scheduler="synchronous")

ROOT = Path(__file__).resolve().parents[1]
SERVICES_SCRIPT = ROOT / "scripts" / "services.sh"
DEFAULT_ENV_FILE = ROOT / "var" / "run" / "services.env"

# service -> (env-file key prefix, binary, Debian package)
_SERVICE_TABLE = {
    "ntp": ("SMARTMETER_NTP", "chronyd", "chrony"),
    "mqtt": ("SMARTMETER_MQTT", "mosquitto", "mosquitto"),
}


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, separator, value = line.partition("=")
        if separator and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def _run_services(*args: str, run_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if run_dir is not None:
        env["SMARTMETER_RUN_DIR"] = str(run_dir)
    return subprocess.run(
        ["bash", str(SERVICES_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class Services:
    """Addresses of the running services, as recorded in their env file."""

    values: Mapping[str, str]
    source: str

    def address(self, service: str) -> tuple[str, int]:
        """``(host, port)`` of ``service`` ("ntp" or "mqtt"); fails or skips if unavailable."""
        prefix, binary, package = _SERVICE_TABLE[service]
        port = self.values.get(f"{prefix}_PORT", "")
        if port:
            return self.values.get(f"{prefix}_HOST", "127.0.0.1"), int(port)
        if self.values.get(f"{prefix}_MISSING"):
            problem = (
                f"{service} service unavailable: {binary} is not installed "
                f"(Debian package '{package}'; `bash scripts/setup.sh` installs it)"
            )
        else:
            problem = f"{service} service unavailable: not recorded by {self.source}"
        _unavailable(problem)


def _unavailable(problem: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    env_file = Path(os.environ.get("SMARTMETER_SERVICES_ENV", DEFAULT_ENV_FILE))
    shared_dir = env_file.parent
    if env_file.is_file() and _run_services("status", run_dir=shared_dir).returncode == 0:
        yield Services(_read_env_file(env_file), source=str(env_file))
        return
    run_dir = tmp_path_factory.mktemp("services")
    started = _run_services("start", "ntp", "mqtt", run_dir=run_dir)
    if started.returncode != 0:
        _run_services("stop", run_dir=run_dir)
        _unavailable(f"scripts/services.sh start failed:\n{started.stdout}{started.stderr}")
    try:
        yield Services(_read_env_file(run_dir / "services.env"), source=str(run_dir))
    finally:
        _run_services("stop", run_dir=run_dir)


@pytest.fixture(scope="session")
def ntp_server(services: Services) -> tuple[str, int]:
    """``(host, port)`` of a real chronyd answering SNTP on 127.0.0.1."""
    return services.address("ntp")


@pytest.fixture(scope="session")
def mqtt_broker(services: Services) -> tuple[str, int]:
    """``(host, port)`` of a real mosquitto broker on 127.0.0.1 (anonymous)."""
    return services.address("mqtt")


@pytest.fixture
def mdns_exclusive() -> Iterator[None]:
    """mDNS on this host to this test alone, among concurrent test processes (pytest-xdist
    workers).  Every zeroconf socket binds UDP 5353 with SO_REUSEPORT, and the kernel hands
    a unicast datagram - the answer to a browser's first (QU) query, RFC 6762 §5.4 - to one
    of them only, whichever process owns it: another worker's responder or browser would
    take it."""
    with open(Path(tempfile.gettempdir()) / "smartmeter-tests-mdns.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def close_run_engines() -> Iterator[None]:
    """Stop the loop thread of every RunEngine the test made (see tests/run_engines.py)."""
    yield
    run_engines.close_all()


# ------------------------------------------------------------------ catalogs (storage, devices)

POSTGRES_SH = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"


@pytest.fixture(scope="session")
def embedded_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One embedded Tiled catalog for the whole session (start-up takes seconds), registered
    as a private profile so ``databroker.from_profile`` opens it."""
    from smartmeter_ophyd.storage import setup_embedded_catalog

    root = tmp_path_factory.mktemp("embedded")
    catalog = setup_embedded_catalog(
        root / "catalog", profile=f"smartmeter-test-{os.getpid()}", profiles_dir=root / "profiles"
    )
    catalog.client  # noqa: B018 - open it now: its portal thread is the session's, not a test's
    yield catalog
    catalog.close()


@pytest.fixture(scope="session")
def recorded_run(embedded_catalog: Any, ntp_server: tuple[str, int]) -> Iterator[Any]:
    """One ``synchronized_fly`` of two emulated meters (``exp1``, ``exp2``) at 4 kHz for 1.5 s
    over UDP into the embedded catalog, ``exp2`` losing three datagrams (a declared gap); the
    run as the catalog serves it."""
    from plans import synchronized_fly
    from smartmeter_ophyd.devices import SmartMeter
    from smartmeter_ophyd.emulator import EmulatorFleet
    from smartmeter_ophyd.storage import make_tiled_writer
    from tests.run_engines import RunEngine

    fleet = EmulatorFleet(2, name_prefix="exp", time_server=ntp_server[0],
                          ntp_port=ntp_server[1]).start()
    meters = [SmartMeter(host, port, name=name, timeout=3.0, emulated=True,
                         data_directory=embedded_catalog.data_directory)
              for name, (host, port) in zip(fleet.names, fleet.addresses, strict=True)]
    try:
        fleet.inject(1, "drop_udp", count=3)
        engine = RunEngine({})
        engine.subscribe(make_tiled_writer(embedded_catalog.client))
        (uid,) = engine(synchronized_fly(meters, 1.5, rate=4000, transport="UDP"))
    finally:
        for meter in meters:
            meter.destroy()
        fleet.close()
    yield embedded_catalog.client[uid]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[dict[str, str]]:
    """``scripts/postgres.sh``: a private PostgreSQL cluster + ``tiled serve`` on ephemeral
    ports, shared by every test of the session; its ``tiled.env`` as a dict."""
    if not (glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb")):
        _unavailable("PostgreSQL server binaries are not installed (Debian package postgresql)")
    # Under /tmp with mode 755: the cluster runs as user postgres, which cannot enter
    # pytest's private (0700) temp directories.
    base = tempfile.mkdtemp(prefix="smartmeter-pg-", dir="/tmp")
    os.chmod(base, 0o755)
    proc = subprocess.run(
        [str(POSTGRES_SH), "start", base], capture_output=True, text=True, timeout=180
    )
    try:
        if proc.returncode != 0:
            pytest.fail(f"scripts/postgres.sh start failed:\n{proc.stdout}\n{proc.stderr}")
        yield dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    finally:
        subprocess.run([str(POSTGRES_SH), "stop", base], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
