"""The embedded catalog's set-up (``storage/_catalog.py``): a new directory gets the database
``tiled catalog init`` would make, whether or not the caller runs an event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

from smartmeter_ophyd.storage import setup_embedded_catalog


def schema(database: Path) -> tuple[set[tuple[str, str, str]], list[tuple[str, ...]]]:
    """(every table, index and trigger with its SQL; the alembic revision rows)."""
    with sqlite3.connect(database) as connection:
        objects = set(connection.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
        revisions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    return objects, revisions


def test_a_new_catalog_is_what_tiled_catalog_init_makes(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs" / "catalog.db"
    theirs.parent.mkdir()
    subprocess.run([sys.executable, "-m", "tiled", "catalog", "init", f"sqlite:///{theirs}"],
                   check=True, capture_output=True, timeout=120)
    catalog = setup_embedded_catalog(tmp_path / "ours", profile="catalog-init",
                                     profiles_dir=tmp_path / "profiles")
    ours_objects, ours_revisions = schema(catalog.directory / "catalog.db")
    theirs_objects, theirs_revisions = schema(theirs)
    assert ours_objects == theirs_objects and len(ours_objects) > 5
    assert ours_revisions == theirs_revisions and len(ours_revisions) == 1

    again = setup_embedded_catalog(tmp_path / "ours", profile="catalog-init",
                                   profiles_dir=tmp_path / "profiles")
    assert schema(again.directory / "catalog.db") == (ours_objects, ours_revisions)
    try:
        assert list(again.client) == []  # Tiled serves it: an empty catalog of runs
    finally:
        again.close()


def test_a_catalog_is_set_up_from_inside_a_running_event_loop(tmp_path: Path) -> None:
    """As in Jupyter, whose kernel runs its loop in the caller's thread."""

    async def set_up() -> Path:
        catalog = setup_embedded_catalog(tmp_path / "catalog", profile="in-a-loop",
                                         profiles_dir=tmp_path / "profiles")
        return catalog.directory / "catalog.db"

    objects, revisions = schema(asyncio.run(set_up()))
    assert len(objects) > 5 and len(revisions) == 1
