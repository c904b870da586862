"""What every ``smartmeter`` sub-command shares: arguments, errors, catalogs, output files.

Intent: user mistakes end in **one line** on stderr and exit status 2 (:class:`UsageError`),
before any meter is touched; a meter's or the catalog's failure ends in one line and exit
status 1; nothing prints a traceback unless ``-vv`` asks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

DEFAULT_PORT: Final = 54321
DEFAULT_PROFILE: Final = "smartmeter"
DATA_DIR_ENV: Final = "SMARTMETER_DATA_DIR"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UsageError(Exception):
    """A user mistake: one line, exit status 2, nothing touched."""


class CommandFailedError(Exception):
    """A meter, the catalog or a tool failed: one line, exit status 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless its help already says it) and keeps line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", "").replace(":class:", "")
                                    .replace("~", ""))


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the command (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def default_data_dir() -> Path:
    """``$SMARTMETER_DATA_DIR``, else ``$XDG_DATA_HOME/smartmeter-ophyd`` (~/.local/share)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "smartmeter-ophyd"


# ------------------------------------------------------------------------ argument types


@dataclass(frozen=True)
class MeterAddress:
    """``[NAME=]HOST[:PORT]`` from the command line."""

    host: str
    port: int
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def meter_address(text: str) -> MeterAddress:
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    elif not _NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"meter name {name!r} in {text!r} must be a Python identifier (letters, digits, _)")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(DEFAULT_PORT)
    if not host:
        raise argparse.ArgumentTypeError(f"no host in {text!r}; expected [NAME=]HOST[:PORT]")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"port {port!r} in {text!r} is not a number; expected [NAME=]HOST[:PORT]") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port {number} in {text!r} is not 1..65535")
    return MeterAddress(host, number, name or None)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def count_in(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {lo}..{hi}")
        return value

    return parse


def add_catalog_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", metavar="PROFILE|URI", default=None,
                   help="Tiled profile name or http(s) URI of a Tiled server (API key from "
                        "$TILED_API_KEY); default: the embedded catalog under --data-dir")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help=f"the embedded catalog, its HDF5 files and the plots (${DATA_DIR_ENV})")


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


# ------------------------------------------------------------------------------ catalogs


@dataclass
class Catalog:
    """An open catalog: a client to read it, where meters write, how runs are written into
    it (:meth:`document_sink`) and how to close it.

    The client is opened on first use: ``record`` and ``rerun`` write through the sink and
    read the catalog only after the run, so the fly does not wait for Tiled's start-up.
    """

    data_directory: Path | None
    readable: tuple[Path, ...]
    description: str
    embedded: Any = None
    server_uri: str | None = None
    """The Tiled server the catalog lives on (an ``http(s)://`` URI or a profile's ``uri``)."""
    journal_root: Path | None = None
    """Where a server catalog's sink keeps its journals."""
    _client: Any = None
    _sink: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.embedded.client
        return self._client

    def document_sink(self) -> Any:
        """The RunEngine callback that writes runs here.

        The embedded catalog and a Tiled server get a :class:`~smartmeter_ophyd.storage.
        JournalSink` (documents journaled here, a writer process fills the catalog; the stop
        document returns once the run is closed in the catalog, so it reads back complete).
        A profile of another in-process catalog gets a ``TiledWriter`` over this client.
        """
        if self._sink is None:
            if self.embedded is not None:
                self._sink = self.embedded.document_sink()
            elif self.server_uri is not None:
                from ..storage import JournalSink

                assert self.journal_root is not None
                self._sink = JournalSink.for_server(
                    self.server_uri, os.environ.get("TILED_API_KEY"), self.journal_root)
            else:
                from ..storage import make_tiled_writer

                self._sink = make_tiled_writer(self.client)
        return self._sink

    def close(self) -> None:
        """Let the sink's writer finish, then close the client (the embedded catalog closes
        both)."""
        from ..storage import close_client

        if self.embedded is not None:
            self.embedded.close()
            return
        close = getattr(self._sink, "close", None)
        if close is not None:
            close()
        if self._client is not None:
            close_client(self._client)


def embedded_dir(data_dir: Path) -> Path:
    return data_dir / "catalog"


def open_catalog(args: argparse.Namespace, *, create: bool, hdf5_dir: Path | None = None
                 ) -> Catalog:
    """The catalog ``--catalog``/``--data-dir`` name (created only when ``create``)."""
    spec: str | None = args.catalog
    if spec is None:
        root = embedded_dir(args.data_dir)
        if not create and not (root / "catalog.db").exists():
            raise UsageError(
                f"no catalog in {args.data_dir} (no runs recorded there yet); record one with "
                "`smartmeter record`, or give --data-dir / --catalog")
    from ..quiet import quiet_tiled

    quiet_tiled()
    if spec is None:
        from ..storage import setup_embedded_catalog

        embedded = setup_embedded_catalog(root, profile=DEFAULT_PROFILE)
        return Catalog(embedded.data_directory, embedded.readable_storage,
                       f"embedded catalog {root} (Tiled profile {DEFAULT_PROFILE!r})", embedded)
    from ..storage import profile_server_uri

    uri = spec if re.match(r"^https?://", spec) else profile_server_uri(spec)
    try:
        if re.match(r"^https?://", spec):
            from ..storage import connect_server

            client = connect_server(spec, api_key=os.environ.get("TILED_API_KEY"))
        else:
            from ..storage import open_catalog as open_profile

            client = open_profile(spec)
    except Exception as exc:
        raise CommandFailedError(f"cannot open catalog {spec!r}: {exc}") from exc
    data = hdf5_dir.resolve() if hdf5_dir is not None else None
    return Catalog(data, (data,) if data is not None else (), f"catalog {spec!r}",
                   server_uri=uri, journal_root=args.data_dir / "journal", _client=client)


RUN_CLOSE_WAIT_S: Final = 120.0
"""How long ``record``/``rerun`` wait, beyond the sink's own wait at the stop document, for
the catalog writer to close a run before they give up reading it back."""


def wait_in_catalog(catalog: Catalog, uid: str) -> Any:
    """Run ``uid`` read back from the catalog, once its writer has closed it there.

    The sink already waited at the stop document; a writer that needed longer (a slow disk,
    a restarted writer replaying the journal) gets :data:`RUN_CLOSE_WAIT_S` more.  A run that
    did not land is a one-line failure naming where its documents are kept.
    """
    from ..storage import CatalogWriteError

    sink = catalog.document_sink()
    wait = getattr(sink, "wait_closed", None)
    try:
        closed = wait is None or wait(uid, timeout=RUN_CLOSE_WAIT_S)
    except CatalogWriteError as exc:
        raise CommandFailedError(str(exc)) from None
    if not closed:
        raise CommandFailedError(
            f"run {uid} is not closed in the {catalog.description} after "
            f"{RUN_CLOSE_WAIT_S:g} s; its documents are kept in {sink.session} and the "
            f"catalog writer finishes it when it can (log: {sink.writer_log})")
    try:
        return catalog.client[uid]
    except KeyError:
        raise CommandFailedError(f"run {uid} is not in the {catalog.description}") from None


def find_run(client: Any, ref: str) -> Any:
    """A run by uid, uid prefix (at least 4 characters) or negative index (-1 = latest)."""
    if re.fullmatch(r"-\d+", ref):
        index = int(ref)
        try:
            return client.values()[index]
        except IndexError:
            raise UsageError(f"there is no run {ref}: the catalog holds {len(client)}") from None
    if len(ref) < 4:
        raise UsageError(f"run {ref!r}: give at least 4 characters of its uid, or -1 for the latest")
    with contextlib.suppress(ValueError):  # Tiled refuses partial uids shorter than 5
        if ref in client:
            return client[ref]
    matches = [uid for uid in client.keys() if str(uid).startswith(ref)]
    if not matches:
        raise UsageError(f"no run whose uid starts with {ref!r} (see `smartmeter runs`)")
    if len(matches) > 1:
        raise UsageError(f"run {ref!r} is ambiguous: {', '.join(m[:12] for m in matches[:5])}")
    return client[matches[0]]


# --------------------------------------------------------------------------------- output


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, as a usage error, a directory that cannot be created or written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} cannot be written (no write access to {probe})")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    if hasattr(value, "value") and hasattr(value, "name"):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def say(text: str) -> None:
    """A progress line for the person at the terminal (stderr, so stdout stays data)."""
    print(text, file=sys.stderr, flush=True)
