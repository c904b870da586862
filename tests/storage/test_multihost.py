"""Two acquisition hosts, one catalog: a PostgreSQL-backed Tiled server (scripts/postgres.sh).

Each "host" is its own process (``_acquisition_host.py``) with its own emulated meters and
RunEngine; both fly at the same time (a shared go signal; the test checks that the runs
overlap) and write through HTTP to the one server - host A with a ``TiledWriter`` in its
RunEngine, host B through ``JournalSink.for_server`` (journal, writer process).  Both runs must close successfully and
read back - through the server's array endpoint - bit for bit equal to the rows the
emulated meters sent (their ground truth), every sample of every meter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smartmeter_ophyd.protocol import Measures
from smartmeter_ophyd.storage import close_client, connect_server, time_window

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.service
def test_two_hosts_write_one_postgres_catalog_at_once(postgres_server, ntp_server, tmp_path) -> None:
    uri, key = postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"]
    data_root = Path(postgres_server["TILED_HDF5_DIR"])
    go = tmp_path / "go"
    hosts = {}
    for name, extra in (("hostA", []), ("hostB", ["--sink"])):
        hosts[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.storage._acquisition_host", "--uri", uri,
             "--api-key", key, "--data-dir", str(data_root / name),
             "--ntp", f"{ntp_server[0]}:{ntp_server[1]}", "--name", name,
             "--out", str(tmp_path / name), "--go", str(go), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    results = {}
    try:
        for name, process in hosts.items():
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line == "ready", f"{name} did not start: {line!r} {process.stderr.read()}"
        go.touch()
        for name, process in hosts.items():
            stdout, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, f"{name} failed:\n{stderr}"
            results[name] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for process in hosts.values():
            if process.poll() is None:
                process.kill()

    a, b = results["hostA"], results["hostB"]
    journals = list((tmp_path / "hostB" / "journal").rglob("*"))
    assert not [p for p in journals if p.suffix in (".docs", ".failed", ".orphaned")], journals
    assert a["start"] < b["stop"] and b["start"] < a["stop"], "the two runs did not overlap"
    client = connect_server(uri, key)
    try:
        _check_runs(client, results, tmp_path)
    finally:
        close_client(client)


def _check_runs(client: Any, results: dict[str, Any], tmp_path: Path) -> None:
    for name, result in results.items():
        run = client[result["uid"]]
        assert run.metadata["start"]["host"] == name
        assert run.metadata["stop"]["exit_status"] == "success"
        for meter in result["meters"]:
            truth = np.load(tmp_path / name / f"{meter}.npy")
            view = time_window(run, -np.inf, np.inf, meter, prefix=meter, access="http")
            got = np.stack([view[f"{meter}_{ch}"].values
                            for ch in Measures.VI.channels], axis=1)
            assert view.attrs["access"] == "http"
            assert got.shape == truth.shape and got.shape[0] > 8000
            assert np.array_equal(got.view(np.uint32), truth.view(np.uint32)), meter
            times = view["time"].values
            assert np.all(np.diff(times) > 0) and abs(times[0] - run.metadata["start"]["time"]) < 30
