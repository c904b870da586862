"""Session-wide catalogs for the storage tests (catalog start-up takes seconds).

``embedded_catalog``: :func:`setup_embedded_catalog` in a session temp dir, registered under a
private profiles directory.  ``postgres_server``: ``scripts/postgres.sh`` (private PostgreSQL
cluster + ``tiled serve``) on ephemeral ports; skipped only when the PostgreSQL server binaries
are absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartmeter_ophyd.storage import EmbeddedCatalog, setup_embedded_catalog

REPO = Path(__file__).resolve().parents[2]
POSTGRES_SH = REPO / "scripts" / "postgres.sh"


@pytest.fixture(scope="session")
def embedded_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCatalog]:
    root = tmp_path_factory.mktemp("embedded")
    catalog = setup_embedded_catalog(
        root / "catalog", profile=f"smartmeter-test-{os.getpid()}", profiles_dir=root / "profiles"
    )
    yield catalog
    catalog.close()


def _have_postgres() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or shutil.which("initdb") is not None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[dict[str, str]]:
    if not _have_postgres():
        pytest.skip("PostgreSQL server binaries (initdb/pg_ctl) are not installed")
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
        env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        yield env
    finally:
        subprocess.run([str(POSTGRES_SH), "stop", base], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
