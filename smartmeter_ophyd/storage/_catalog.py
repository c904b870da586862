"""Where runs go: an embedded Tiled catalog (the default) or a Tiled server.

Intent: one call gives a working bluesky catalog with no server, no port and no process to
manage, reachable by name through ``databroker.from_profile`` (= ``tiled.client.from_profile``).

* :func:`setup_embedded_catalog` creates ``<directory>/catalog.db`` (SQLite metadata),
  ``<directory>/storage.sqlite`` + ``<directory>/data`` (event tables / zarr arrays of
  non-stream data) and ``<directory>/hdf5`` (where meters write their HDF5 files, registered as
  ``readable_storage`` - without that Tiled accepts the registration and then fails every read
  with HTTP 500).  It writes a Tiled profile in ``direct`` mode (the catalog is built
  in-process from the profile, served over ASGI without a socket) into a profiles directory
  and returns an :class:`EmbeddedCatalog` whose ``client`` feeds
  ``bluesky_tiled_plugins.TiledWriter``.  The root carries the ``CatalogOfBlueskyRuns`` spec, so
  the client offers bluesky search helpers.
* :func:`connect_server` connects to a ``tiled serve`` process (for example the PostgreSQL
  backed one of ``scripts/postgres.sh``); :func:`write_server_profile` registers it by name (the API key is
  passed at open time or via ``TILED_API_KEY``: Tiled profiles cannot hold one).

Writing runs: ``RE.subscribe(catalog.document_sink())`` (:class:`~._service.JournalSink`).
The sink journals every document and a writer process it starts (and stops with
:meth:`EmbeddedCatalog.close`) fills the catalog through Tiled's catalog adapter - no HTTP,
no server work in the acquisition process (see ``_direct.py`` and ``_service.py`` for why and
the measured costs).  ``make_tiled_writer(catalog.client)`` still works (a ``TiledWriter``
over an in-process app: every request's server work then runs in the acquisition process).

Multi-process: the catalog database is put in SQLite's WAL mode (readers never block the
writer) and event tables go to ``storage.sqlite`` (SQLite) - DuckDB, the previous table
storage, keeps one exclusive connection per process, so a reader process would lock the
writer out.  An existing ``storage.duckdb`` stays readable.

Profiles directory: by default the *user* profile directory Tiled searches
(``$TILED_PROFILES`` or the platform's ``~/.config/tiled/profiles``).  Tiled reads
``TILED_PROFILES`` once, when ``tiled.profiles`` is first imported; a ``profiles_dir`` that is
not on Tiled's search path is therefore appended to ``tiled.profiles.paths`` **for this
process** (other processes need ``TILED_PROFILES`` set in their environment).

Limits: initialisation, once per directory, does what ``tiled catalog init`` does (Tiled's
tables, then alembic's head revision stamped) in this process, on a thread of its own (alembic
runs its own event loop); Tiled's ``init_if_not_exists`` would start that command in a
subprocess, which imports Tiled again (~4 s).  Each ``from_profile`` builds its own
in-process app over the same SQLite file for reading; SQLite serialises writers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import sqlite3
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ..quiet import quiet_tiled

logger = logging.getLogger(__name__)

BLUESKY_SPEC: Final = {"name": "CatalogOfBlueskyRuns", "version": "3.0"}
DEFAULT_PROFILE: Final = "smartmeter"
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def default_profiles_dir() -> Path:
    """The user profile directory Tiled searches (honours ``TILED_PROFILES``)."""
    from tiled.profiles import paths

    return Path(paths[-1])


def _check_profile_name(profile: str) -> None:
    if not _PROFILE_NAME.match(profile):
        raise ValueError(
            f"profile name {profile!r} must be letters, digits, '_', '-' or '.' "
            "(it becomes a file name)"
        )


def _register_profiles_dir(profiles_dir: Path) -> None:
    from tiled.profiles import load_profiles, paths

    resolved = profiles_dir.resolve()
    if all(Path(p).resolve() != resolved for p in paths):
        paths.append(resolved)
        logger.info("added %s to Tiled's profile search path for this process", resolved)
    load_profiles.cache_clear()


def _write_profile(profiles_dir: Path, profile: str, content: dict[str, Any]) -> Path:
    profiles_dir.mkdir(parents=True, exist_ok=True)
    path = profiles_dir / f"{profile}.yml"
    tmp = path.with_suffix(".yml.tmp")
    tmp.write_text(yaml.safe_dump({profile: content}, sort_keys=False))
    os.replace(tmp, path)
    _register_profiles_dir(profiles_dir)
    return path


@dataclass
class EmbeddedCatalog:
    """An in-process Tiled catalog registered as a Tiled profile."""

    directory: Path
    profile: str
    profile_path: Path
    data_directory: Path
    """Where meters write their HDF5 files (covered by the catalog's readable storage)."""
    catalog_uri: str
    readable_storage: tuple[Path, ...]
    writable_storage: tuple[str, ...] = ()
    storage_uris: tuple[str, ...] = ()
    """Every readable storage entry of the profile (files and SQL table storage)."""
    _client: Any = field(default=None, repr=False)
    _sink: Any = field(default=None, repr=False)

    @property
    def client(self) -> Any:
        """A tiled client over this catalog (opened through the profile on first use)."""
        if self._client is None:
            self._client = self.open()
        return self._client

    def open(self) -> Any:
        """A fresh client (a new in-process app) - what another user session would get."""
        return open_catalog(self.profile)

    @property
    def journal_directory(self) -> Path:
        """Where document sinks keep their sessions' journals."""
        return self.directory / "journal"

    @property
    def writer_config(self) -> dict[str, Any]:
        """The catalog as the writer process opens it (``tiled.catalog.from_uri`` args)."""
        return {
            "uri": self.catalog_uri,
            "writable_storage": list(self.writable_storage),
            "readable_storage": list(self.storage_uris),
        }

    def document_sink(self, **options: Any) -> Any:
        """The RunEngine callback that writes runs here (one per catalog object).

        ``RE.subscribe(catalog.document_sink())``.  Options go to
        :class:`~._service.JournalSink` on first call (``live_period``, ``close_timeout``,
        ``keep_journals``, ``raise_on_failure``); later calls return the same sink.
        """
        if self._sink is None:
            from ._service import JournalSink

            self._sink = JournalSink(self.writer_config, self.journal_directory, **options)
        elif options:
            raise ValueError("the document sink exists already; options apply on first call")
        return self._sink

    def close(self) -> None:
        """Let the writer finish and stop it, close the shared client (idempotent)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._client is not None:
            close_client(self._client)
            self._client = None


def setup_embedded_catalog(
    directory: str | os.PathLike[str],
    profile: str = DEFAULT_PROFILE,
    *,
    profiles_dir: str | os.PathLike[str] | None = None,
    data_directory: str | os.PathLike[str] | None = None,
    extra_readable_storage: Sequence[str | os.PathLike[str]] = (),
) -> EmbeddedCatalog:
    """Create (or reuse) an embedded catalog under ``directory`` and register it as ``profile``.

    ``data_directory`` (default ``<directory>/hdf5``) is where meters should write; it and
    ``extra_readable_storage`` become the catalog's readable storage.  Idempotent: calling it
    again on the same directory reuses the catalog and rewrites the profile.
    """
    _check_profile_name(profile)
    root = Path(directory).resolve()
    data_dir = Path(data_directory).resolve() if data_directory else root / "hdf5"
    zarr_dir = root / "data"
    for d in (root, data_dir, zarr_dir):
        d.mkdir(parents=True, exist_ok=True)
    readable = (data_dir, *(Path(p).resolve() for p in extra_readable_storage))
    catalog_uri = f"sqlite:///{root / 'catalog.db'}"

    quiet_tiled()
    if not (root / "catalog.db").exists():
        logger.info("initialising Tiled catalog %s", catalog_uri)
        with concurrent.futures.ThreadPoolExecutor(1, "tiled-catalog-init") as pool:
            pool.submit(_initialise, catalog_uri).result()
    tables = root / "storage.sqlite"
    for database in (root / "catalog.db", tables):
        _use_wal(database)
    writable = (str(zarr_dir), f"sqlite:///{tables}")
    old_tables = root / "storage.duckdb"
    readable_uris = [
        *writable,
        *([f"duckdb:///{old_tables}"] if old_tables.exists() else []),
        *(str(p) for p in readable),
    ]

    content = {
        "direct": {
            "authentication": {"allow_anonymous_access": True},
            "trees": [
                {
                    "path": "/",
                    "tree": "catalog",
                    "args": {
                        "uri": catalog_uri,
                        "writable_storage": list(writable),
                        "readable_storage": [str(p) for p in readable]
                        + ([f"duckdb:///{old_tables}"] if old_tables.exists() else []),
                        "init_if_not_exists": False,
                        "specs": [dict(BLUESKY_SPEC)],
                    },
                }
            ],
        }
    }
    pdir = Path(profiles_dir) if profiles_dir is not None else default_profiles_dir()
    profile_path = _write_profile(pdir, profile, content)
    logger.info(
        "embedded catalog %s registered as Tiled profile %r (%s)", root, profile, profile_path
    )
    return EmbeddedCatalog(
        directory=root,
        profile=profile,
        profile_path=profile_path,
        data_directory=data_dir,
        catalog_uri=catalog_uri,
        readable_storage=readable,
        writable_storage=writable,
        storage_uris=tuple(readable_uris),
    )


def _initialise(catalog_uri: str) -> None:
    """``tiled catalog init --if-not-exists``: Tiled's tables, then alembic's head revision.

    Run on a thread without an event loop: both steps run their own (``asyncio.run``)."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION, initialize_database
    from tiled.utils import ensure_specified_sql_driver

    database = ensure_specified_sql_driver(catalog_uri)

    async def create_tables() -> bool:
        engine = create_async_engine(database)
        try:
            await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
        except UninitializedDatabase:
            await initialize_database(engine)
            return True
        finally:
            await engine.dispose()
        return False  # another process initialised it first

    if asyncio.run(create_tables()):
        with warnings.catch_warnings():
            # Tiled's alembic.ini template predates alembic's path_separator option
            warnings.filterwarnings("ignore", "No path_separator found", DeprecationWarning)
            stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, database)


def _use_wal(database: Path) -> None:
    """Put an SQLite database in WAL mode (persistent): readers and a writer in several
    processes without "database is locked"."""
    connection = sqlite3.connect(database, timeout=30)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        connection.close()
    if str(mode).lower() != "wal":
        logger.warning("%s stays in journal mode %s (WAL refused)", database, mode)


def open_catalog(profile: str = DEFAULT_PROFILE) -> Any:
    """Open a catalog by profile name through ``databroker.from_profile`` (quietly: no Tiled
    banner, no Starlette test-client warning, see :mod:`smartmeter_ophyd.quiet`)."""
    import databroker

    quiet_tiled()
    return databroker.from_profile(profile)


def profile_server_uri(profile: str) -> str | None:
    """The server URI a Tiled profile names (None: no such profile, or an in-process one)."""
    from tiled.profiles import load_profiles

    entry = load_profiles().get(profile)
    uri = entry[1].get("uri") if entry is not None else None
    return str(uri) if uri else None


def connect_server(uri: str, api_key: str | None = None) -> Any:
    """A tiled client for a running ``tiled serve`` (e.g. started by scripts/postgres.sh)."""
    from tiled.client import from_uri

    if api_key is not None and not api_key.isalnum():
        raise ValueError("Tiled single-user API keys must be alphanumeric")
    return from_uri(uri, api_key=api_key)


def write_server_profile(
    profile: str,
    uri: str,
    *,
    profiles_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Register a Tiled server by name.

    Tiled profiles cannot hold an API key (its profile schema forbids one); pass it when
    opening - ``databroker.from_profile(profile, api_key=key)`` - or set ``TILED_API_KEY``.
    """
    _check_profile_name(profile)
    pdir = Path(profiles_dir) if profiles_dir is not None else default_profiles_dir()
    return _write_profile(pdir, profile, {"uri": uri})


def close_client(client: Any) -> None:
    """Close a tiled client's context (stops an in-process app's threads)."""
    context = getattr(client, "context", None)
    if context is not None:
        try:
            context.close()
        except Exception:  # closing is best effort; a half-closed app must not mask errors
            logger.debug("closing tiled context failed", exc_info=True)
