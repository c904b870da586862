"""The SmartMeter as a classic ophyd (v1) device and bluesky flyer.

Intent: one object that a bluesky user puts in any plan.  ``bluesky.protocols`` are implemented
directly (duck typing, no ``ophyd.flyers`` helpers) so a later port to ophyd-async is mechanical:

* **Readable / Triggerable** (count/step scans): ``trigger()`` asks the meter for its per-line
  RMS voltage (V) and current (mA), active/reactive/apparent power (W/var/VA), energy (Wh),
  frequency (Hz) and phase angle (deg); each is three scalar signals (``l1``/``l2``/``l3``).  The
  firmware puts no time in these replies (§3.10), so each reading's timestamp is the **host's
  receive time**.  ``getPower``'s apparent power equals the reactive power (§12 #9) and
  ``getEnergy`` resets the ADE accumulators (§12 #11); both are passed through as sent.
  While the meter samples these commands are refused (§2.8): the trigger status fails with
  :class:`~smartmeter_ophyd.client.MeterBusyError`.
* **Configurable**: the meter's settings are ``kind="config"`` signals.  Writable ones send
  their command on ``set``/``put`` (the status finishes on the meter's reply and fails with
  the firmware's message); values are validated by the codec before anything is sent.
  Sampling settings (rate, measures, transport, prefix, flow control) are local until
  ``prepare``/``kickoff``.  Read-only ones mirror the info line (§2.5); WiFi passwords are
  never read or stored.
* **Flyable / Preparable / Collectable / WritesStreamAssets**: ``prepare(FlyConfig | dict)``,
  ``kickoff()`` (done at the first sample), ``complete()`` (a :class:`ProgressStatus`, done
  when the meter has stopped and the :class:`~smartmeter_ophyd.client.SessionSummary`
  reconciles), ``describe_collect()`` (singly nested: ``declare_stream(..., collect=True)``),
  ``collect_asset_docs(index)`` and ``get_index()`` (samples flushed to HDF5).
* **Stageable**: ``stage()`` connects; ``unstage()`` stops a running fly.

Per-run metadata lands in the catalog three ways: :meth:`SmartMeter.run_metadata` (identity
and configuration, for the start document), the ``sampling_reply``/``stop_summary`` config
signals, and the :attr:`SmartMeter.run_summary` readable, read once after the fly into a
small ``meter_summary`` stream whose descriptor carries the meter's final configuration.
The HDF5 file carries the same identity, sample reply and stop summary as attributes.

Samples beyond the target: when ``n_samples`` is reached the device sends ``stop``; the
meter then flushes its ring buffer (the tail, §4.8), so a fly may hold more samples than
asked for.  Everything the meter sends is recorded - nothing is dropped - and the stop
summary accounts for every sample.  Gaps become rows of the gaps table (never zero-filled);
a late packet (UDP, already declared missing) is logged and not inserted.

Flow control: ``flow_control="cts"`` flies are governed by :class:`~._flow.CtsGovernor`
(``cts_policy``): the meter is paused while the host-side backlog is large and resumed
before its ring buffer nears the overflow reboot (§4.10, §5.1); ``last_flow_stats`` says
what happened.

Failures name their cause: a fly that another connection stopped (§4.8: the meter goes
idle, no stop reply reaches this device) fails with the clients the meter announced during
the fly (§2.1); samples the client received that never reached the consumer fail the fly
instead of leaving a short file behind a reconciled summary.

Threads: the client runs on its own event-loop thread; each fly runs one consumer thread
that pulls blocks and writes HDF5 (plus a governor thread for ``cts``).  ``destroy()``/
``close()`` stops them all.

Scheduled starts (§6.4): the sample reply's ``startTs`` is only the scheduled second; the
firmware starts about 1 ms earlier and reports the real start as ``start_ts`` in the stop
reply (§6.4 step 5, §4.8).  As soon as the stop reply arrives - before the tail is written,
the file is closed and the last collect - the device moves the HDF5 time origin there
(:meth:`~smartmeter_ophyd.storage.WaveformWriter.rebase_start`), so the file and the catalog
serve the meter's real sample times.  For an immediate start both values are the same (§4.4)
and nothing changes.  Without a stop reply (stopped elsewhere, connection lost) the origin
stays the reply's ``startTs``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus, Status
from ophyd.utils.errors import ReadOnlyError

from ..client import (
    Gap,
    MeterClient,
    MeterCommandError,
    MeterConnectionError,
    MeterError,
    MeterTimeoutError,
    SessionSummary,
    SyncSamplingSession,
)
from ..protocol import (
    CommandError,
    DeviceInfo,
    LogLine,
    Measures,
    SampleReply,
    SetCalibration,
    SetDailyRestart,
    SetLogLevel,
    SetMqttServer,
    SetName,
    SetStreamServer,
    SetTimeServer,
    Transport,
)
from ..storage import GapAssets, StreamAssets, WaveformWriter, gap_data_keys, stream_data_keys
from ._flow import CtsGovernor, CtsPolicy, FlowStats
from ._fly import FlyConfig, ProgressStatus, coerce_measures, coerce_transport
from ._ntp import MeterNtp

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 54321
BLOCK_POLL_S: Final = 0.25
"""How often the consumer thread wakes without data to look at stop requests."""

OTHER_CLIENT_LOG: Final = re.compile(r"Client with IP (\S+) connected on port (\d+)")
"""§2.1: the meter tells connected clients about every new one (text of an INFO log)."""

READING_UNITS: Final = {
    "voltage": "V",
    "current": "mA",
    "active_power": "W",
    "reactive_power": "var",
    "apparent_power": "VA",
    "energy": "Wh",
    "frequency": "Hz",
    "phase_angle": "deg",
}


# ------------------------------------------------------------------------------ signals


class MeterReadback(Signal):
    """A value the device updates from the meter; users cannot write it."""

    def put(self, value: Any, **kwargs: Any) -> None:
        raise ReadOnlyError(f"{self.name} is read from the meter and cannot be written")

    def set(self, value: Any, **kwargs: Any) -> Status:
        raise ReadOnlyError(f"{self.name} is read from the meter and cannot be written")

    def _update(self, value: Any, timestamp: float | None = None) -> None:
        super().put(value, timestamp=timestamp if timestamp is not None else time.time())


class LineValue(MeterReadback):
    """One line's value of a reading: a float, described with the units of its parent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, value=math.nan, **kwargs)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        units = getattr(self.parent, "units", "")
        desc[self.name].update({"dtype": "number", "shape": [], "dtype_numpy": "<f8",
                                "units": units})
        return desc


class LineReadings(Device):
    """A per-line (L1, L2, L3) reading as three scalar signals.

    Scalars, not a 3-element array: TiledWriter stores arrays of <= 16 elements in its
    table as their text repr, while scalar fields become real float columns.
    """

    l1 = Cpt(LineValue, kind=Kind.hinted)
    l2 = Cpt(LineValue, kind=Kind.hinted)
    l3 = Cpt(LineValue, kind=Kind.hinted)

    def __init__(self, *args: Any, units: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = units

    def _update(self, values: Sequence[float], timestamp: float | None = None) -> None:
        now = timestamp if timestamp is not None else time.time()
        for signal, value in zip((self.l1, self.l2, self.l3), values, strict=True):
            signal._update(float(value), now)


class MeterSetting(Signal):
    """A meter setting: ``set``/``put`` validates, sends the command, waits for the reply.

    ``command(meter_client, value)`` performs the request; ``validate(value)`` returns the
    value to store (raises ``CommandError``/``ValueError`` before anything is sent).
    """

    def __init__(
        self,
        *args: Any,
        validate: Callable[[Any], Any],
        command: Callable[[MeterClient, Any], Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._validate = validate
        self._command = command

    @property
    def meter(self) -> SmartMeter:
        device = self.parent
        assert isinstance(device, SmartMeter)
        return device

    def _checked(self, value: Any) -> Any:
        try:
            return self._validate(value)
        except (CommandError, ValueError, TypeError) as exc:
            raise MeterCommandError(self.meter.meter_label, f"{self.attr_name}: {exc}") from exc

    def set(self, value: Any, **kwargs: Any) -> DeviceStatus:  # type: ignore[override]
        checked = self._checked(value)
        status = DeviceStatus(self.meter, call_stop_on_failure=False)

        def run() -> None:
            try:
                self._command(self.meter.client, checked)
            except Exception as exc:
                status.set_exception(exc)
            else:
                super(MeterSetting, self).put(checked)
                status.set_finished()

        threading.Thread(target=run, name=f"{self.name} set", daemon=True).start()
        return status

    def put(self, value: Any, **kwargs: Any) -> None:
        checked = self._checked(value)
        self._command(self.meter.client, checked)
        super().put(checked)

    def _update(self, value: Any) -> None:
        super().put(value)


class LocalSamplingSetting(Signal):
    """A sampling setting kept on the host until ``prepare``/``kickoff`` (validated on put)."""

    def __init__(self, *args: Any, validate: Callable[[Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._validate = validate

    def put(self, value: Any, **kwargs: Any) -> None:
        parent = self.parent
        label = parent.meter_label if isinstance(parent, SmartMeter) else self.name
        try:
            value = self._validate(value)
        except (CommandError, ValueError, TypeError) as exc:
            raise MeterCommandError(label, f"{self.attr_name}: {exc}") from exc
        super().put(value, **kwargs)


def _text(command: type[Any]) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        command(value)
        return value

    return validate


def _calibration(value: Any) -> list[float]:
    factors = tuple(float(v) for v in value)
    SetCalibration(factors)
    return list(factors)


def _daily_restart(value: Any) -> list[int]:
    hour, minute = (int(v) for v in value)
    SetDailyRestart(hour, minute)
    return [hour, minute]


def _log_level(value: Any) -> str:
    return str(SetLogLevel(value).level.name)


def _rate(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"rate={value!r} must be a positive integer (Hz)")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} must be True or False")
    return value


def _flow(value: Any) -> str:
    if value not in ("none", "cts"):
        raise ValueError(f"flow_control={value!r}; allowed: 'none', 'cts'")
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_dict(summary: SessionSummary) -> dict[str, Any]:
    """A :class:`SessionSummary` as plain JSON-able values."""
    return {f.name: _jsonable(getattr(summary, f.name)) for f in dataclasses.fields(summary)}


class FlyError(MeterError):
    """A fly scan did not end with every sample accounted for."""


# ------------------------------------------------------------------------------ helpers


class GapStream:
    """The gaps of a meter's current fly as a collectable of its own stream.

    bluesky collects one stream per ``collect``; gaps are not samples, so they go to
    ``"<meter>_gaps"`` (see :mod:`smartmeter_ophyd.storage`).  Declare and collect it per
    meter: gap counts differ between meters, so several meters cannot share a gaps stream.
    """

    def __init__(self, meter: SmartMeter) -> None:
        self.meter = meter
        self.parent = None

    @property
    def name(self) -> str:
        return f"{self.meter.name}_gaps"

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        return gap_data_keys(self.meter.name, self.meter.source_label)

    def get_index(self) -> int:
        assets = self.meter._gap_assets
        return 0 if assets is None else assets.get_index()

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        assets = self.meter._gap_assets
        if assets is not None:
            yield from assets.collect_asset_docs(index)


class RunSummary:
    """Readable: the last fly's reconciliation, read once after ``complete`` (``meter_summary``).

    Its ``read_configuration`` is the meter's, so the stream's descriptor records the meter's
    configuration *after* the fly (sample reply and stop summary included).
    """

    FIELDS: Final = {
        "received_samples": ("integer", "<i8"),
        "missing_samples": ("integer", "<i8"),
        "device_sent_samples": ("integer", "<i8"),
        "gaps": ("integer", "<i8"),
        "explained": ("boolean", "|b1"),
        "start_ts": ("number", "<f8"),
        "stop_ts": ("number", "<f8"),
        "hdf5_path": ("string", "<U0"),
        "summary": ("string", "<U0"),
    }

    def __init__(self, meter: SmartMeter) -> None:
        self.meter = meter
        self.parent = None

    @property
    def name(self) -> str:
        return f"{self.meter.name}_run"

    def _key(self, field: str) -> str:
        return f"{self.meter.name}_run_{field}"

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for field, (dtype, dtype_numpy) in self.FIELDS.items():
            key: dict[str, Any] = {"source": f"{self.meter.source_label}/{field}", "dtype": dtype,
                                   "shape": []}
            if dtype != "string":
                key["dtype_numpy"] = dtype_numpy
            if field in ("start_ts", "stop_ts"):
                key["units"] = "s"
            out[self._key(field)] = key
        return out

    def read(self) -> dict[str, dict[str, Any]]:
        summary = self.meter.last_summary
        path = self.meter.hdf5_path or ""
        now = time.time()

        def opt_int(v: int | None) -> int:
            return -1 if v is None else int(v)

        def opt_float(v: float | None) -> float:
            return math.nan if v is None else float(v)

        if summary is None:
            values: dict[str, Any] = {
                "received_samples": 0, "missing_samples": 0, "device_sent_samples": -1,
                "gaps": 0, "explained": False, "start_ts": math.nan, "stop_ts": math.nan,
                "hdf5_path": path, "summary": "{}",
            }
        else:
            values = {
                "received_samples": summary.received_samples,
                "missing_samples": summary.missing_declared,
                "device_sent_samples": opt_int(summary.device_sent_samples),
                "gaps": summary.gaps + summary.corrupt_frames,
                "explained": bool(summary.explained),
                "start_ts": opt_float(summary.start_ts),
                "stop_ts": opt_float(summary.stop_ts),
                "hdf5_path": path,
                "summary": json.dumps(summary_dict(summary)),
            }
        return {self._key(k): {"value": v, "timestamp": now} for k, v in values.items()}

    def trigger(self) -> Status:
        status = Status()
        status.set_finished()
        return status

    def describe_configuration(self) -> dict[str, dict[str, Any]]:
        return dict(self.meter.describe_configuration())

    def read_configuration(self) -> dict[str, dict[str, Any]]:
        return dict(self.meter.read_configuration())


# ------------------------------------------------------------------------------ device


class SmartMeter(Device):
    """A three-phase SmartMeter (firmware 2.2) as an ophyd device and bluesky flyer.

    Constructing it does no I/O; :meth:`connect` (or ``wait_for_connection``/``stage``)
    opens the connection.  ``data_directory`` is where fly scans write their HDF5 files (it
    must be readable storage of the catalog).  See the module docstring for the protocols.
    """

    # readings (trigger/read)
    voltage = Cpt(LineReadings, units="V", kind=Kind.hinted)
    current = Cpt(LineReadings, units="mA", kind=Kind.hinted)
    active_power = Cpt(LineReadings, units="W", kind=Kind.normal)
    reactive_power = Cpt(LineReadings, units="var", kind=Kind.normal)
    apparent_power = Cpt(LineReadings, units="VA", kind=Kind.normal)
    energy = Cpt(LineReadings, units="Wh", kind=Kind.normal)
    frequency = Cpt(LineReadings, units="Hz", kind=Kind.normal)
    phase_angle = Cpt(LineReadings, units="deg", kind=Kind.normal)

    # writable settings (sent on set/put)
    meter_name = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=_text(SetName), command=lambda c, v: c.set_name(v),
    )
    mqtt_server = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=_text(SetMqttServer), command=lambda c, v: c.set_mqtt_server(v),
    )
    stream_server = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=_text(SetStreamServer), command=lambda c, v: c.set_stream_server(v),
    )
    time_server = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=_text(SetTimeServer), command=lambda c, v: c.set_time_server(v),
    )
    calibration = Cpt(
        MeterSetting, value=[1.0] * 6, kind=Kind.config,
        validate=_calibration, command=lambda c, v: c.set_calibration(tuple(v)),
    )
    daily_restart = Cpt(
        MeterSetting, value=[-1, 0], kind=Kind.config,
        validate=_daily_restart, command=lambda c, v: c.set_daily_restart(v[0], v[1]),
    )
    log_level = Cpt(
        MeterSetting, value="INFO", kind=Kind.config,
        validate=_log_level, command=lambda c, v: c.set_log_level(v),
    )

    # sampling settings (local until prepare/kickoff)
    sampling_rate = Cpt(LocalSamplingSetting, value=8000, kind=Kind.config, validate=_rate)
    measures = Cpt(
        LocalSamplingSetting, value=Measures.VI.reported, kind=Kind.config,
        validate=lambda v: coerce_measures(v).reported,
    )
    transport = Cpt(
        LocalSamplingSetting, value=Transport.TCP.value, kind=Kind.config,
        validate=lambda v: coerce_transport(v).value,
    )
    sample_prefix = Cpt(LocalSamplingSetting, value=True, kind=Kind.config, validate=_bool)
    flow_control = Cpt(LocalSamplingSetting, value="none", kind=Kind.config, validate=_flow)

    # read-only, from the info line (§2.5) and the last fly
    firmware_version = Cpt(MeterReadback, value="", kind=Kind.config)
    compiled = Cpt(MeterReadback, value="", kind=Kind.config)
    ip = Cpt(MeterReadback, value="", kind=Kind.config)
    rtc = Cpt(MeterReadback, value=False, kind=Kind.config)
    psram = Cpt(MeterReadback, value=False, kind=Kind.config)
    buffer_size = Cpt(MeterReadback, value=0, kind=Kind.config)
    wifi_ssids = Cpt(MeterReadback, value="[]", kind=Kind.config)
    meter_state = Cpt(MeterReadback, value="", kind=Kind.config)
    sampling_reply = Cpt(MeterReadback, value="{}", kind=Kind.config)
    stop_summary = Cpt(MeterReadback, value="{}", kind=Kind.config)
    ntp = Cpt(MeterNtp, kind=Kind.omitted)
    """``meter.ntp``: trigger an NTP sync; the meter's confidence, offset and time (``_ntp``)."""

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        name: str,
        data_directory: str | os.PathLike[str],
        timeout: float = 5.0,
        reconnect: bool = True,
        cts_policy: CtsPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__("", name=name, **kwargs)
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self.reconnect = reconnect
        self.data_directory = Path(data_directory)
        self.cts_policy = cts_policy or CtsPolicy()
        """When a ``flow_control="cts"`` fly pauses and resumes the meter (see ``_flow``)."""
        self.last_flow_stats: FlowStats | None = None
        """What flow control did in the last ``cts`` fly (None for other flies)."""
        self._client: MeterClient | None = None
        self._client_lock = threading.Lock()
        self._fly_config: FlyConfig | None = None
        self._session: SyncSamplingSession | None = None
        self._writer: WaveformWriter | None = None
        self._assets: StreamAssets | None = None
        self._gap_assets: GapAssets | None = None
        self._complete_status: ProgressStatus | None = None
        self._consumer: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._other_clients: list[str] = []
        self.last_summary: SessionSummary | None = None
        self.last_sample_reply: SampleReply | None = None
        self.gap_stream = GapStream(self)
        self.run_summary = RunSummary(self)

    # ------------------------------------------------------------------ connection

    @property
    def meter_label(self) -> str:
        """How errors name this meter: ``smartmeter <name> (<host>:<port>)``."""
        if self._client is not None:
            return self._client.meter_label
        return f"smartmeter {self.name} ({self.host}:{self.port})"

    @property
    def source_label(self) -> str:
        return f"smartmeter://{self.host}:{self.port}"

    @property
    def client(self) -> MeterClient:
        """The connected :class:`MeterClient` (raises if :meth:`connect` was not called)."""
        client = self._client
        if client is None or not client.connected:
            raise MeterConnectionError(self.meter_label, "not connected (call connect() first)")
        return client

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def connect(self) -> DeviceInfo:
        """Open the connection (idempotent) and refresh the configuration from the info line."""
        with self._client_lock:
            if self._client is not None and self._client.connected:
                info = self._client.info
                assert info is not None
                return info
            if self._client is not None:
                self._client.close()
                self._client = None
            client = MeterClient(
                self.host, self.port, name=self.name, timeout=self.timeout,
                reconnect=self.reconnect,
            )
            try:
                info = client.connect()
            except BaseException:
                client.close()
                raise
            self._client = client
        self._apply_info(info)
        logger.info("%s: connected (firmware %s)", self.meter_label, info.version)
        return info

    def wait_for_connection(self, all_signals: bool = False, timeout: float | None = None) -> None:
        self.connect()

    def close(self) -> None:
        """Stop a running fly, close the connection and join every thread of this device."""
        if self._session is not None:
            self._stop_requested.set()
        consumer = self._consumer
        if consumer is not None and consumer is not threading.current_thread():
            consumer.join(self.timeout * 4 + 5)
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def destroy(self) -> None:
        self.close()
        super().destroy()

    def refresh(self) -> DeviceInfo:
        """Re-read the info line and update the read-only configuration signals."""
        info = self.client.get_info()
        self._apply_info(info)
        return info

    def _apply_info(self, info: DeviceInfo) -> None:
        now = time.time()
        self.firmware_version._update(info.version or "", now)
        self.compiled._update(info.compiled or "", now)
        self.ip._update(info.ip or "", now)
        self.rtc._update(bool(info.rtc), now)
        self.psram._update(bool(info.psram), now)
        self.buffer_size._update(int(info.buffer_size or 0), now)
        self.wifi_ssids._update(json.dumps(list(info.ssids)), now)
        self.meter_state._update(info.state or "", now)
        self.meter_name._update(info.name or "")
        self.mqtt_server._update(info.mqtt_server or "")
        self.stream_server._update(info.stream_server or "")
        self.time_server._update(info.time_server or "")
        if info.calibration is not None and len(info.calibration) == 6:
            self.calibration._update(list(info.calibration))
        self.daily_restart._update(list(info.daily_restart) if info.daily_restart else [-1, 0])
        if self._client is not None:
            self.log_level._update(self._client.async_client.log_level.name)

    def run_metadata(self) -> dict[str, Any]:
        """Identity and configuration for a run's start document (``md={"meters": ...}``)."""
        return {
            "name": self.name,
            "meter_name": self.meter_name.get(),
            "host": self.host,
            "port": self.port,
            "firmware": self.firmware_version.get(),
            "compiled": self.compiled.get(),
            "fly": self._fly_config.as_dict() if self._fly_config else None,
        }

    # ------------------------------------------------------------------ stage / read

    def stage(self) -> list[Any]:
        self.connect()
        return super().stage()  # type: ignore[no-any-return]

    def unstage(self) -> list[Any]:
        self.stop()
        return super().unstage()  # type: ignore[no-any-return]

    def trigger(self) -> DeviceStatus:
        """Fetch every reading (status fails with MeterBusyError while sampling, §2.8)."""
        status = DeviceStatus(self, call_stop_on_failure=False)

        def fetch() -> None:
            try:
                client = self.client
                voltage = client.get_voltage()
                self.voltage._update(list(voltage.values))
                current = client.get_current()
                self.current._update(list(current.values))
                power = client.get_power()
                now = time.time()
                self.active_power._update(list(power.active), now)
                self.reactive_power._update(list(power.reactive), now)
                self.apparent_power._update(list(power.apparent), now)
                self.energy._update(list(client.get_energy().energy))
                self.frequency._update(list(client.get_frequency().values))
                self.phase_angle._update(list(client.get_phase_angle().values))
            except Exception as exc:
                status.set_exception(exc)
            else:
                status.set_finished()

        threading.Thread(target=fetch, name=f"{self.name} trigger", daemon=True).start()
        return status

    # ------------------------------------------------------------------ fly scan

    def _local_fly_config(self) -> FlyConfig:
        return FlyConfig.from_value(
            {
                "rate": self.sampling_rate.get(),
                "measures": self.measures.get(),
                "transport": self.transport.get(),
                "prefix": self.sample_prefix.get(),
                "flow_control": self.flow_control.get(),
            },
            self.meter_label,
        )

    def prepare(self, value: FlyConfig | Mapping[str, Any]) -> Status:
        """Validate and store the settings of the next fly (nothing is sent to the meter)."""
        config = FlyConfig.from_value(value, self.meter_label)
        if self._session is not None:
            raise MeterCommandError(self.meter_label, "prepare: a fly is still running")
        self._fly_config = config
        self.sampling_rate.put(config.rate)
        self.measures.put(config.measures)
        self.transport.put(config.transport)
        self.sample_prefix.put(config.prefix)
        self.flow_control.put(config.flow_control)
        status = Status()
        status.set_finished()
        return status

    @property
    def fly_config(self) -> FlyConfig:
        """The settings the next/current fly uses (prepared, else the local signals)."""
        return self._fly_config or self._local_fly_config()

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        measures = coerce_measures(self.fly_config.measures)
        return stream_data_keys(self.name, measures.channels, measures.units, self.source_label)

    def get_index(self) -> int:
        return 0 if self._assets is None else self._assets.get_index()

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        if self._assets is not None:
            yield from self._assets.collect_asset_docs(index)

    @property
    def hdf5_path(self) -> str | None:
        return None if self._writer is None else self._writer.path

    def kickoff(self) -> DeviceStatus:
        """Start sampling; the status is done when the first sample has arrived."""
        config = self.fly_config
        if self._session is not None or (self._consumer is not None and self._consumer.is_alive()):
            raise MeterCommandError(self.meter_label, "kickoff: a fly is already running")
        self._stop_requested.clear()
        self.last_summary = None
        self._writer = self._assets = self._gap_assets = None
        started = DeviceStatus(self)
        self._complete_status = ProgressStatus(self, target=config.target_samples)
        self._consumer = threading.Thread(
            target=self._fly, args=(config, started, self._complete_status),
            name=f"{self.name} fly", daemon=True,
        )
        self._consumer.start()
        return started

    def complete(self) -> ProgressStatus:
        """Status done when the meter stopped and every sample is accounted for."""
        if self._complete_status is None:
            raise MeterCommandError(self.meter_label, "complete: kickoff() was not called")
        return self._complete_status

    def stop(self, *, success: bool = False) -> None:
        """Ask a running fly to stop the meter (the consumer sends ``stop`` and drains)."""
        if self._consumer is not None and self._consumer.is_alive():
            self._stop_requested.set()

    # ------------------------------------------------------------------ the consumer thread

    def _open_writer(self, reply: SampleReply, info: DeviceInfo | None) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.data_directory / f"{self.name}-{stamp}-{uuid.uuid4().hex[:8]}.h5"
        start_ts = reply.start_ts if reply.start_ts is not None else 0.0
        if not start_ts:
            logger.warning(
                "%s: the meter reported startTs %r (no NTP sync yet, §6.1); sample times "
                "in %s count from 0", self.meter_label, reply.start_ts, path,
            )
        self._writer = WaveformWriter(
            path, reply.measures, reply.sampling_rate, start_ts,
            {
                "name": (info.name if info else None) or self.name,
                "host": f"{self.host}:{self.port}",
                "firmware": info.version if info else None,
                "compiled": info.compiled if info else None,
                "sampling_reply": _jsonable(reply.raw_fields),
            },
        )
        self._assets = StreamAssets(self._writer, self.name, source_label=self.source_label)
        self._gap_assets = GapAssets(self._writer, self.name, source_label=self.source_label)

    def _record_gap(self, gap: Gap) -> None:
        writer = self._writer
        assert writer is not None
        span = gap.missing_packets
        if span is None:
            logger.warning(
                "%s: late packet %s (%d samples) already declared missing; not inserted",
                self.meter_label, gap.received_packet,
                0 if gap.late_values is None else gap.late_values.shape[0],
            )
            return
        writer.record_gap(*span, gap.missing_samples)

    def _fly(self, config: FlyConfig, started: DeviceStatus, done: ProgressStatus) -> None:
        label = self.meter_label
        session: SyncSamplingSession | None = None
        governor: CtsGovernor | None = None
        client: MeterClient | None = None
        unsubscribe: Callable[[], None] | None = None
        target = config.target_samples
        consumed = 0
        self.last_flow_stats = None
        try:
            if not self.connected:
                self.connect()
            client = self.client
            label = self.meter_label
            self._other_clients = []
            unsubscribe = client.subscribe_logs(self._watch_other_clients)
            session = client.sample(config.sample_config())
            self._session = session
            reply = session.session.reply
            self.last_sample_reply = reply
            self.sampling_reply._update(json.dumps(_jsonable(reply.raw_fields)))
            self._open_writer(reply, client.info)
            if config.flow_control == "cts":
                # flowCtr sessions start paused (§5.1); the governor resumes at once and then
                # keeps the host backlog bounded without letting the meter overflow (§4.10).
                governor = CtsGovernor(session, lambda: consumed, self.cts_policy, name=self.name)
                governor.start()
            writer = self._writer
            assert writer is not None
            first_wait = self.timeout * 4
            if config.start_time is not None:
                first_wait += max(0.0, config.start_time - time.time())
            silence_limit = first_wait
            last_data = time.monotonic()
            stop_sent = False
            summary: SessionSummary | None = None

            def send_stop() -> SessionSummary:
                if governor is not None:
                    self.last_flow_stats = governor.close()
                assert session is not None
                stopped = session.stop()
                self._apply_actual_start(stopped, scheduled=config.start_time is not None)
                return stopped

            while True:
                if not stop_sent and self._stop_requested.is_set():
                    summary = send_stop()
                    stop_sent = True
                if governor is not None and governor.error is not None:
                    raise governor.error
                try:
                    block = session.next_block(BLOCK_POLL_S)
                except MeterTimeoutError:
                    if stop_sent:
                        continue
                    paused = governor is not None and governor.paused
                    if not paused and time.monotonic() - last_data > silence_limit:
                        raise MeterTimeoutError(
                            label, f"no sample data for {silence_limit:.1f} s during the fly"
                        ) from None
                    if paused:
                        last_data = time.monotonic()
                    continue
                if block is None:
                    break
                last_data = time.monotonic()
                silence_limit = self.timeout * 4
                for gap in block.gaps:
                    self._record_gap(gap)
                if block.n_samples:
                    writer.append(block.values, block.packets, block.frame_samples)
                    if not started.done:
                        started.set_finished()
                consumed += block.n_samples
                done.report(writer.samples_appended)
                if (
                    not stop_sent
                    and target is not None
                    and writer.samples_appended + session.session.missing_declared >= target
                ):
                    logger.info("%s: %d samples reached; stopping the meter", label, target)
                    summary = send_stop()
                    stop_sent = True
            if governor is not None and self.last_flow_stats is None:
                self.last_flow_stats = governor.close()  # the session ended without our stop
            if summary is None:
                summary = session.summary
            assert summary is not None
            self._finish(summary, started, done, scheduled=config.start_time is not None)
        except BaseException as exc:
            if governor is not None and self.last_flow_stats is None:
                self.last_flow_stats = governor.close()
            self._fail(exc, session, started, done, scheduled=config.start_time is not None)
        finally:
            self._session = None
            if unsubscribe is not None and client is not None and client is self._client and client.connected:
                try:
                    unsubscribe()
                except Exception as exc:  # only bookkeeping; the fly's outcome stands
                    logger.warning("%s: could not unsubscribe from logs: %s", label, exc)

    def _watch_other_clients(self, line: LogLine) -> None:
        """Runs on the client's loop: remember other connections opened during the fly."""
        match = OTHER_CLIENT_LOG.fullmatch(line.text)
        if match is not None:
            self._other_clients.append(f"{match.group(1)}:{match.group(2)}")

    def _apply_actual_start(self, summary: SessionSummary, *, scheduled: bool) -> None:
        """Move the file's time origin to the stop reply's ``start_ts`` (§6.4 step 5, §4.8).

        A no-op when it equals the sample reply's ``startTs`` (immediate starts, §4.4) or when
        there was no stop reply.
        """
        writer = self._writer
        actual = summary.start_ts
        if writer is None or writer.closed or actual is None or not math.isfinite(actual):
            return
        if actual == writer.start_ts:
            return
        if not scheduled:
            logger.warning(
                "%s: the stop reply's start_ts %.3f differs from the sample reply's startTs "
                "%.3f of an immediate start (§4.4 says they match); using the stop reply's",
                self.meter_label, actual, writer.start_ts,
            )
        writer.rebase_start(actual)

    def _finish(
        self, summary: SessionSummary, started: DeviceStatus, done: ProgressStatus, *, scheduled: bool
    ) -> None:
        writer = self._writer
        assert writer is not None
        self.last_summary = summary
        self._apply_actual_start(summary, scheduled=scheduled)
        as_dict = summary_dict(summary)
        writer.close(as_dict)
        self.stop_summary._update(json.dumps(as_dict))
        done.report(writer.samples_written)
        try:
            self.refresh()
        except MeterError as exc:
            logger.warning("%s: could not refresh the info line after the fly: %s", self.meter_label, exc)
        if not started.done:
            started.set_exception(
                FlyError(self.meter_label, f"the fly ended before any sample arrived ({summary.ended_by})")
            )
        if writer.samples_appended != summary.received_samples:
            # The client counted them on arrival; the consumer never got them (see report:
            # a blocking next_block that times out while its block is in transit drops it).
            done.set_exception(FlyError(
                self.meter_label,
                f"the client received {summary.received_samples} samples but only "
                f"{writer.samples_appended} reached {writer.path}: samples were lost between the "
                "client and this device's consumer",
            ))
            return
        if not summary.explained:
            reason = "samples not accounted for: " + "; ".join(summary.notes)
            if summary.ended_by == "stopped elsewhere":
                # §4.8: any connection may stop the meter; its reply goes to that connection only.
                others = ", ".join(self._other_clients) or "none seen (it may have connected earlier)"
                reason = (
                    "the meter stopped sampling without this device asking: another connection "
                    f"sent stop (§4.8); other clients that connected during the fly: {others}; "
                    + reason
                )
            done.set_exception(FlyError(self.meter_label, reason))
            return
        logger.info("%s: fly complete: %s", self.meter_label, "; ".join(summary.notes))
        done.set_finished()

    def _fail(
        self,
        exc: BaseException,
        session: SyncSamplingSession | None,
        started: DeviceStatus,
        done: ProgressStatus,
        *,
        scheduled: bool,
    ) -> None:
        logger.warning("%s: fly failed: %s", self.meter_label, exc)
        if session is not None and session.summary is None and self.connected:
            try:
                session.stop()
            except Exception as stop_exc:  # the original error is what the user must see
                logger.warning("%s: stop after failure failed: %s", self.meter_label, stop_exc)
        if session is not None and session.summary is not None:
            self.last_summary = session.summary
            self.stop_summary._update(json.dumps(summary_dict(session.summary)))
        writer = self._writer
        if writer is not None and not writer.closed:
            try:
                # keep whatever arrived before the failure: nothing is dropped
                for block in session.session.drain_nowait() if session is not None else ():
                    for gap in block.gaps:
                        self._record_gap(gap)
                    if block.n_samples:
                        writer.append(block.values, block.packets, block.frame_samples)
                if self.last_summary is not None:
                    self._apply_actual_start(self.last_summary, scheduled=scheduled)
                writer.close(summary_dict(self.last_summary) if self.last_summary else None)
            except Exception as close_exc:
                logger.warning("%s: closing %s failed: %s", self.meter_label, writer.path, close_exc)
        error = exc if isinstance(exc, Exception) else FlyError(self.meter_label, repr(exc))
        if not started.done:
            started.set_exception(error)
        if not done.done:
            done.set_exception(error)
