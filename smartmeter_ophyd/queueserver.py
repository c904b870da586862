"""Start-up module for bluesky-queueserver: meters, a RunEngine that writes to a catalog, plans.

Run the queue server on it (Redis must be running; ``scripts/services.sh start redis``)::

    export SMARTMETER_QS_METERS="meter1=10.0.0.21,meter2=10.0.0.22:54321"
    start-re-manager --startup-module smartmeter_ophyd.queueserver \\
        --existing-plans-devices ./existing_plans_and_devices.yaml \\
        --update-existing-plans-devices ENVIRONMENT_OPEN \\
        --user-group-permissions ./user_group_permissions.yaml \\
        --redis-addr localhost:6379
    qserver environment open
    qserver queue add plan '{"name": "synchronized_fly", "args": [["meter1", "meter2"], 10]}'
    qserver queue start

The worker process inherits the manager's environment:

* ``SMARTMETER_QS_METERS`` - ``NAME=HOST[:PORT]`` separated by commas: one
  :class:`~smartmeter_ophyd.devices.SmartMeter` per entry, a module-level device named NAME.
* ``SMARTMETER_QS_EMULATED`` - ``1`` records the meters as emulated (provenance).
* ``SMARTMETER_QS_CATALOG`` - a Tiled profile name or ``http(s)://`` URI (API key from
  ``TILED_API_KEY``); default: the embedded catalog under ``SMARTMETER_DATA_DIR``, the same
  one ``smartmeter record`` uses.
* ``SMARTMETER_QS_HDF5_DIR`` - with a server catalog: where the meters write HDF5 (the
  server's readable storage).

Documents reach the embedded catalog and a Tiled server through a
:class:`~smartmeter_ophyd.storage.JournalSink`: journaled in the worker, written by a writer
process, each plan returning once its run is closed in the catalog; the journals of a server
catalog (a URI, or a profile naming one) are kept under ``SMARTMETER_DATA_DIR/journal``.
A profile of an in-process catalog gets a ``TiledWriter`` over that profile's client.  The
sink is closed when the worker exits (the writer finishes what is journaled, then stops); a
worker that is killed leaves its journals to the writer, which finishes them when its stdin
closes.

Plans: thin wrappers of :mod:`plans` with annotations the queue server can check before it
runs anything (meter lists restricted to the meters above, enums for transport and flow
control, bounds from the plans' own limits).  ``host_clock`` is left out: it is an object,
not a queue parameter.  This module must keep real annotations (no ``from __future__ import
annotations``): queueserver 0.0.25 cannot resolve string annotations.
"""

import os
import typing
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any

from bluesky import RunEngine
from bluesky_queueserver import parameter_annotation_decorator

import plans as _plans
from smartmeter_ophyd.devices import SmartMeter
from smartmeter_ophyd.quiet import quiet_tiled
from smartmeter_ophyd.storage import (
    JournalSink,
    connect_server,
    make_tiled_writer,
    open_catalog,
    profile_server_uri,
    setup_embedded_catalog,
)

METERS_ENV = "SMARTMETER_QS_METERS"
DEFAULT_PORT = 54321


def parse_meters(text: str) -> list[tuple[str, str, int]]:
    """``[(name, host, port)]`` from ``NAME=HOST[:PORT],…`` (errors name the bad entry)."""
    out = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, address = entry.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"{METERS_ENV}: {entry!r} is not NAME=HOST[:PORT] with a Python "
                             "identifier as NAME")
        host, colon, port = address.rpartition(":")
        if not colon:
            host, port = address, str(DEFAULT_PORT)
        out.append((name, host, int(port)))
    return out


def _at_exit(close: typing.Callable[[], None]) -> None:
    """Call ``close`` when this process exits - also in the queue server's worker, a forked
    ``multiprocessing`` child, which runs multiprocessing's finalizers but not ``atexit``."""
    Finalize(None, close, exitpriority=10)


def _catalog() -> tuple[Any, Any, Path, tuple[Path, ...]]:
    """``(client, document sink, data directory, readable storage)`` of the catalog the
    environment names; the sink is closed when the worker process exits."""
    from smartmeter_ophyd.cli import default_data_dir

    quiet_tiled()
    spec = os.environ.get("SMARTMETER_QS_CATALOG")
    if not spec:
        embedded = setup_embedded_catalog(default_data_dir() / "catalog", profile="smartmeter")
        sink = embedded.document_sink()
        _at_exit(embedded.close)
        return embedded.client, sink, embedded.data_directory, embedded.readable_storage
    hdf5 = os.environ.get("SMARTMETER_QS_HDF5_DIR")
    if not hdf5:
        raise RuntimeError("SMARTMETER_QS_CATALOG needs SMARTMETER_QS_HDF5_DIR (where the "
                           "meters write HDF5 files the catalog server can read)")
    key = os.environ.get("TILED_API_KEY")
    server = spec if spec.startswith(("http://", "https://")) else profile_server_uri(spec)
    client = connect_server(spec, api_key=key) if server == spec else open_catalog(spec)
    if server is not None:
        sink = JournalSink.for_server(server, key, default_data_dir() / "journal")
        _at_exit(sink.close)
    else:  # a profile of an in-process catalog: a TiledWriter over its client
        sink = make_tiled_writer(client)
    return client, sink, Path(hdf5), (Path(hdf5),)


catalog, _sink, _data_directory, _readable = _catalog()
RE = RunEngine({})
RE.subscribe(_sink)

_emulated = os.environ.get("SMARTMETER_QS_EMULATED", "") == "1"
METER_NAMES = []
for _name, _host, _port in parse_meters(os.environ.get(METERS_ENV, "")):
    globals()[_name] = SmartMeter(_host, _port, name=_name, data_directory=_data_directory,
                                  readable_root=_readable, emulated=_emulated)
    METER_NAMES.append(_name)

_METERS = {"annotation": "typing.List[Meters]", "devices": {"Meters": METER_NAMES}}
_TRANSPORT = {"annotation": "Transports", "enums": {"Transports": ["TCP", "UDP"]}}
_FLOW = {"annotation": "typing.Optional[FlowControl]",
         "enums": {"FlowControl": ["cts", "reqSamples"]}}
_MEASURES = {"annotation": "Measures", "enums": {"Measures": [
    "v,i,v,i,v,i", "v,i_L1", "v,i_L2", "v,i_L3", "p,q", "v,i_RMS"]}}


@parameter_annotation_decorator({
    "description": "Record meters for `duration` seconds in one run, all starting on one "
                   "NTP-checked instant (plans.synchronized_fly).",
    "parameters": {
        "meters": _METERS,
        "duration": {"description": "seconds of samples per meter", "min": 0.001},
        "rate": {"description": "Hz, a divisor of 32000 (§4.3)", "min": 1, "max": 32000},
        "measures": _MEASURES,
        "transport": _TRANSPORT,
        "start_in": {"annotation": "typing.Optional[float]",
                     "description": "seconds to the common start (0.5..20), 0 = immediate, "
                                    "None = earliest safe instant"},
        "ntp_confidence_ms": {"min": 0.001, "max": 200},
        "ntp_attempts": {"min": 1, "max": 100},
        "ntp_period": {"annotation": "typing.Optional[float]", "min": 1},
        "flow_control": _FLOW,
        "request_size": {"annotation": "typing.Optional[int]", "min": 11, "max": 128},
        "flush_period": {"min": 0.05, "max": 60},
        "md": {"annotation": "typing.Optional[dict]"},
    },
})
def synchronized_fly(
    meters: typing.List[SmartMeter],  # noqa: UP006 - queueserver reads typing.List
    duration: float,
    *,
    rate: int = 8000,
    measures: str = "v,i,v,i,v,i",
    transport: str = "TCP",
    start_in: typing.Optional[float] = None,  # noqa: UP045
    ntp_confidence_ms: float = 5.0,
    ntp_attempts: int = 3,
    ntp_period: typing.Optional[float] = 60.0,  # noqa: UP045
    flow_control: typing.Optional[str] = None,  # noqa: UP045
    request_size: typing.Optional[int] = None,  # noqa: UP045
    flush_period: float = 0.5,
    md: typing.Optional[dict] = None,  # noqa: UP045
) -> typing.Generator[Any, Any, str]:
    return (yield from _plans.synchronized_fly(
        meters, duration, rate=rate, measures=measures, transport=transport,
        start_in=start_in, ntp_confidence_ms=ntp_confidence_ms, ntp_attempts=ntp_attempts,
        ntp_period=ntp_period, flow_control=flow_control, request_size=request_size,
        flush_period=flush_period, md=md))


@parameter_annotation_decorator({
    "description": "Record meters sharing one link, each sending in its own time slot "
                   "(plans.slotted_fly, §5.3).",
    "parameters": {
        "meters": _METERS,
        "duration": {"min": 0.001},
        "rate": {"min": 1, "max": 32000},
        "measures": _MEASURES,
        "link_mbps": {"min": 0.001},
        "meter_mbps": {"min": 0.001},
        "slots": {"annotation": "typing.Optional[int]", "min": 1},
        "start_in": {"annotation": "typing.Optional[float]"},
        "md": {"annotation": "typing.Optional[dict]"},
    },
})
def slotted_fly(
    meters: typing.List[SmartMeter],  # noqa: UP006
    duration: float,
    *,
    rate: int = 8000,
    measures: str = "v,i,v,i,v,i",
    link_mbps: float = 10.0,
    meter_mbps: float = 6.0,
    slots: typing.Optional[int] = None,  # noqa: UP045
    start_in: typing.Optional[float] = None,  # noqa: UP045
    md: typing.Optional[dict] = None,  # noqa: UP045
) -> typing.Generator[Any, Any, str]:
    return (yield from _plans.slotted_fly(
        meters, duration, rate=rate, measures=measures, link_mbps=link_mbps,
        meter_mbps=meter_mbps, slots=slots, start_in=start_in, md=md))


@parameter_annotation_decorator({
    "description": "Read every meter every `period` seconds for `duration` seconds "
                   "(plans.monitor).",
    "parameters": {"meters": _METERS, "period": {"min": 0.5}, "duration": {"min": 0.001},
                   "md": {"annotation": "typing.Optional[dict]"}},
})
def monitor(
    meters: typing.List[SmartMeter],  # noqa: UP006
    period: float = 10.0,
    duration: float = 3600.0,
    *,
    md: typing.Optional[dict] = None,  # noqa: UP045
) -> typing.Generator[Any, Any, str]:
    return (yield from _plans.monitor(meters, period, duration, md=md))


@parameter_annotation_decorator({
    "description": "Repeat a recorded run: same plan, same arguments, meter settings "
                   "restored (plans.rerun).",
    "parameters": {"uid": {"description": "the run's uid (or 4+ first characters)"},
                   "meters": _METERS, "md": {"annotation": "typing.Optional[dict]"}},
})
def rerun(
    uid: str,
    meters: typing.List[SmartMeter],  # noqa: UP006
    *,
    md: typing.Optional[dict] = None,  # noqa: UP045
) -> typing.Generator[Any, Any, str]:
    return (yield from _plans.rerun(uid, meters, catalog=catalog, md=md))
