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
* **Flyable / Preparable / Collectable / WritesStreamAssets**:

  - ``prepare(FlyConfig | dict)`` checks everything before anything is sent; a scheduled
    (``start_time``) or plan-released (``release="plan"``) fly is armed here: the status is
    done when the meter accepted ``sample`` (§6.4), never sent twice;
  - ``kickoff()`` releases an armed fly (``cts true``, §5.1) or starts one, and is done when
    the meter really sampled (the first sample; for a scheduled start, the meter's start);
  - ``complete()`` is a :class:`ProgressStatus`, done when the meter has stopped and the
    :class:`~smartmeter_ophyd.client.SessionSummary` reconciles; it fails naming the meter
    and the cause, after everything received was written;
  - ``describe_collect()`` is singly nested (``declare_stream(meter, name=meter.name,
    collect=True)``; under a RunEngine ``kickoff`` refuses an undeclared stream, so
    ``bluesky.plans.fly`` fails before any meter starts); ``collect_asset_docs(index)`` and
    ``get_index()`` (samples flushed to HDF5).
* **Stageable / Pausable**: ``stage()`` connects; ``unstage()`` and ``pause()`` stop a
  running fly and wait until the meter is idle.
* **Children and companions**: ``meter.ntp`` (:class:`~._ntp.MeterNtp`, trigger an NTP
  sync), ``meter.gap_stream``, ``meter.timing_stream`` (the §6.5 sync records),
  ``meter.live_stream`` (per-second RMS, power, frequency), ``meter.run_summary``,
  ``meter.link_state`` (for suspenders).  At the end of a fly ``/time`` is rewritten from the
  meter's own records (:func:`smartmeter_ophyd.timing.model_times`).

Per-run metadata lands in the catalog three ways: :meth:`SmartMeter.run_metadata` (identity
and configuration, for the start document), the ``sampling_reply``/``stop_summary`` config
signals, and :attr:`SmartMeter.run_summary`, the meter's row of the run's ``meter_summary``
table (its counts and its final state, written once after the fly).
The HDF5 file carries the same identity, sample reply and stop summary as attributes.

Samples beyond the target: when ``n_samples`` is reached the device sends ``stop``; the
meter then flushes its ring buffer (the tail, §4.8), so a fly may hold more samples than
asked for.  Everything the meter sends is recorded - nothing is dropped - and the stop
summary accounts for every sample.  Gaps become rows of the gaps table (never zero-filled);
a late or duplicate packet (UDP: declared missing before, or already received) is logged and
not inserted.

Flow control (§5): ``"cts"`` flies are paused and resumed by a
:class:`~._flow.CtsGovernor` (``cts_policy``) so the host's backlog stays bounded and the
meter's ring buffer never nears its overflow reboot (§4.10); ``"reqSamples"`` flies are
pulled by the host; ``slot`` flies send in their seconds (§5.3).  ``last_flow_stats`` says
what flow control did.

Failures name their cause: a fly that another connection stopped (§4.8: the meter goes
idle, no stop reply reaches this device) fails with the clients the meter announced during
the fly (§2.1); whatever ends a fly, everything received is written and declared.

Threads: none of its own.  Every client of the process runs on one shared event-loop thread
(:class:`~smartmeter_ophyd.client.MeterClient`); each fly is a
:class:`~._controller.FlyController` coroutine there, and HDF5 writes run on that loop's
single I/O thread.  Statuses follow coroutines (:mod:`._status`).  ``destroy()``/``close()``
stop a running fly and wait for it.

MQTT flies (§4.14): a fly whose ``transport`` is ``"MQTT"`` is commanded and received through
an MQTT broker, not the TCP connection (which stays open for settings and the info line, and
receives the firmware's one INFO log line per sample).  The broker is the one the meter
publishes to: by default the meter's own ``mqtt_server`` setting (from the info line, or as
last set through ``meter.mqtt_server``) on the firmware's fixed port 1883 (§8.1);
``SmartMeter(..., mqtt_broker=...)`` names it as this host reaches it (another address, a
port other than 1883, or one shared :class:`~smartmeter_ophyd.client.MqttBroker` for many
meters).  The device opens its own broker connection at the first MQTT fly and closes it in
:meth:`SmartMeter.close`.  Samples
arrive unnumbered (one JSON message each, QoS 0): a sample the broker lost shows up as
``unexplained`` in the reconciliation, never as a silent hole.

Why a fly stopped: the device records who asked the meter to stop (``"<n> samples
reached"``, ``stop()`` from the plan or the RunEngine, ``unstage``, ``pause``, ``close``,
silence, a write error; none when the meter stopped by itself) as ``stop_requested`` in the
``stop_summary`` config signal (so in the run's ``meter_summary`` table), in the HDF5
file's ``stop_summary`` attribute and as :attr:`SmartMeter.last_stop_reason`.  The stop
document's ``reason`` is not the device's to write: on a failure it is the exception's text,
but after ``RE.abort(reason)`` bluesky (1.15) leaves it empty for every plan built on
``bpp.run_wrapper`` - the wrapper closes the run with ``exit_status="abort"`` and no reason,
and the RunEngine uses its stored reason only for a run the plan left open.  So the device's
record above is where an aborted run says what happened to each meter.

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

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ophyd import Component as Cpt
from ophyd import Device, Kind
from ophyd.status import DeviceStatus

from .. import __version__
from ..client import (
    AsyncMeterClient,
    ClientEvent,
    ConnectionLost,
    MeterClient,
    MeterCommandError,
    MeterConnectionError,
    MeterError,
    MeterIdentityError,
    SessionSummary,
)
from ..protocol import (
    CommandError,
    DeviceInfo,
    Measures,
    SampleReply,
    SetMqttServer,
    SetName,
    SetStreamServer,
    SetTimeServer,
    Transport,
    check_start_window,
)
from ._controller import FlyController, check_not_running
from ._flow import CtsPolicy, FlowStats
from ._fly import FlyConfig, ProgressStatus, coerce_measures, coerce_transport
from ._live import LiveSummary
from ._ntp import MeterNtp
from ._records import GapStream, RunSummary, jsonable
from ._signals import (
    HintedLineReadings,
    LineReadings,
    LineValue,
    LocalSamplingSetting,
    MeterReadback,
    MeterSetting,
    checked_bool,
    checked_calibration,
    checked_daily_restart,
    checked_flow,
    checked_log_level,
    checked_rate,
    checked_text,
)
from ._status import status_from_coroutine
from ._timing import TimingStream

if TYPE_CHECKING:  # h5py, event_model and aiomqtt load with the first fly that needs them
    from ..client import AsyncMqttBroker, AsyncMqttMeter, MqttBroker
    from ..storage import GapAssets, StreamAssets, WaveformWriter

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 54321
MQTT_PORT: Final = 1883
"""The port the firmware connects to on its ``mqttServer`` (§8.1); it cannot be changed."""

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


# ------------------------------------------------------------------------------ device


class SmartMeter(Device):
    """A three-phase SmartMeter (firmware 2.2) as an ophyd device and bluesky flyer.

    Constructing it does no I/O; :meth:`connect` (or ``wait_for_connection``/``stage``)
    opens the connection.  ``data_directory`` is where fly scans write their HDF5 files (it
    must be readable storage of the catalog).  See the module docstring for the protocols.

    ``mqtt_broker`` is only used by flies with ``transport="MQTT"`` (§4.14).  Left None, the
    device uses the broker the meter itself is configured for - its ``mqtt_server`` setting
    (the info line, or as last set through ``meter.mqtt_server``) on port 1883, the only
    port the firmware uses (§8.1) - which is what a user who set the meter up expects.
    Give a host, or ``(host, port)``, when this host reaches that broker under another name
    or port (NAT, a bridge, a test broker), or an open
    :class:`~smartmeter_ophyd.client.MqttBroker` to share one connection among many meters
    (the device never closes a broker it was given).
    """

    # readings (trigger/read)
    voltage = Cpt(HintedLineReadings, units="V", kind=Kind.hinted)
    current = Cpt(LineReadings, units="mA", kind=Kind.normal)
    active_power = Cpt(LineReadings, units="W", kind=Kind.normal)
    total_active_power = Cpt(LineValue, kind=Kind.hinted)
    """The sum of the three lines' active power (W): what a person watches live."""
    reactive_power = Cpt(LineReadings, units="var", kind=Kind.normal)
    apparent_power = Cpt(LineReadings, units="VA", kind=Kind.normal)
    energy = Cpt(LineReadings, units="Wh", kind=Kind.normal)
    frequency = Cpt(LineReadings, units="Hz", kind=Kind.normal)
    phase_angle = Cpt(LineReadings, units="deg", kind=Kind.normal)

    # writable settings (sent on set/put)
    meter_name = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=checked_text(SetName), command=lambda c, v: c.set_name(v),
    )
    mqtt_server = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=checked_text(SetMqttServer), command=lambda c, v: c.set_mqtt_server(v),
    )
    stream_server = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=checked_text(SetStreamServer), command=lambda c, v: c.set_stream_server(v),
    )
    time_server = Cpt(
        MeterSetting, value="", kind=Kind.config,
        validate=checked_text(SetTimeServer), command=lambda c, v: c.set_time_server(v),
    )
    calibration = Cpt(
        MeterSetting, value=[1.0] * 6, kind=Kind.config,
        validate=checked_calibration, command=lambda c, v: c.set_calibration(tuple(v)),
    )
    daily_restart = Cpt(
        MeterSetting, value=[-1, 0], kind=Kind.config,
        validate=checked_daily_restart, command=lambda c, v: c.set_daily_restart(v[0], v[1]),
    )
    log_level = Cpt(
        MeterSetting, value="INFO", kind=Kind.config,
        validate=checked_log_level, command=lambda c, v: c.set_log_level(v),
    )

    # sampling settings (local until prepare/kickoff)
    sampling_rate = Cpt(LocalSamplingSetting, value=8000, kind=Kind.config, validate=checked_rate)
    measures = Cpt(
        LocalSamplingSetting, value=Measures.VI.reported, kind=Kind.config,
        validate=lambda v: coerce_measures(v).reported,
    )
    transport = Cpt(
        LocalSamplingSetting, value=Transport.TCP.value, kind=Kind.config,
        validate=lambda v: coerce_transport(v).value,
    )
    sample_prefix = Cpt(LocalSamplingSetting, value=True, kind=Kind.config, validate=checked_bool)
    flow_control = Cpt(LocalSamplingSetting, value="none", kind=Kind.config, validate=checked_flow)

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
    link_state = Cpt(MeterReadback, value="disconnected", kind=Kind.omitted)
    """``connected``, ``lost`` (reconnecting) or ``disconnected``: for bluesky suspenders."""
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
        readable_root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        emulated: bool = False,
        live_period_s: float = 1.0,
        mqtt_broker: MqttBroker | str | tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__("", name=name, **kwargs)
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self.reconnect = reconnect
        self.data_directory = Path(data_directory)
        self.emulated = bool(emulated)
        """Recorded in every run and file: whether this is an emulated meter (the wire cannot
        tell: the emulator answers byte for byte as firmware 2.2 does)."""
        if readable_root is None or isinstance(readable_root, str | os.PathLike):
            roots = () if readable_root is None else (readable_root,)
        else:
            roots = tuple(readable_root)
        self.readable_roots: tuple[Path, ...] = tuple(Path(r) for r in roots)
        """The catalog's readable storage (``EmbeddedCatalog.readable_storage``): fly files must
        lie under one of them so the run can be read back.  Empty: not checked."""
        self.cts_policy = cts_policy or CtsPolicy()
        """When a ``flow_control="cts"`` fly pauses and resumes the meter (see ``_flow``)."""
        self.last_flow_stats: FlowStats | None = None
        """What flow control did in the last ``cts`` fly (None for other flies)."""
        self._client: MeterClient | None = None
        self._client_lock = threading.Lock()
        self._identity: DeviceInfo | None = None
        self._unsubscribe_events: Callable[[], None] | None = None
        self._fly_config: FlyConfig | None = None
        self._controller: FlyController | None = None
        self._writer: WaveformWriter | None = None
        self._assets: StreamAssets | None = None
        self._gap_assets: GapAssets | None = None
        self._complete_status: ProgressStatus | None = None
        self._declared = False
        self.last_summary: SessionSummary | None = None
        self.last_sample_reply: SampleReply | None = None
        self.gap_stream = GapStream(self)
        self.timing_stream = TimingStream(self)
        self.live_stream = LiveSummary(self, live_period_s)
        """``<meter>_live``: RMS, power and frequency per ``live_period_s`` of a fly (hinted)."""
        self.run_summary = RunSummary(self)
        self.mqtt_broker = _checked_broker(mqtt_broker, name)
        """Where MQTT flies go: None (the meter's own ``mqtt_server``, port 1883, §8.1), a
        host, ``(host, port)``, or a shared :class:`~smartmeter_ophyd.client.MqttBroker`."""
        self._own_broker: AsyncMqttBroker | None = None
        self.last_stop_reason: str | None = None
        """Who asked the meter to stop the last fly (None: it stopped by itself or no fly)."""
        self._check_readable()

    def __repr__(self) -> str:
        # ophyd's repr lists every component (~1.4 ms a meter, noticeable at 50 meters in
        # logs and tracebacks); this reads attributes only: no signal, no network.
        state = "flying" if self.flying else "connected" if self.connected else "not connected"
        emulated = ", emulated=True" if self.emulated else ""
        return (f"SmartMeter(name={self.name!r}, host={self.host!r}, port={self.port}"
                f"{emulated}, state={state!r})")

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
        """Open the connection (idempotent) and refresh the configuration from the info line.

        A device that was connected before only reconnects to the same meter: an address
        that now answers with another meter's name raises :class:`MeterIdentityError`.
        """
        with self._client_lock:
            if self._client is not None and self._client.connected:
                info = self._client.info
                assert info is not None
                return info
            if self._client is not None:
                self._close_client()
            client = MeterClient(
                self.host, self.port, name=self.name, timeout=self.timeout,
                reconnect=self.reconnect,
            )
            try:
                info = client.connect()
                if self._identity is not None and info.name != self._identity.name:
                    raise MeterIdentityError(
                        client.meter_label,
                        f"{self.host}:{self.port} now answers as meter {info.name!r}, not "
                        f"{self._identity.name!r} (another meter took the address, or it was "
                        "renamed); create a new device for it",
                    )
            except BaseException:
                client.close()
                raise
            self._client = client
            self._identity = info
            self._unsubscribe_events = client.subscribe_events(self._on_client_event)
        self.link_state._update("connected")
        self._apply_info(info)
        logger.info("%s: connected (firmware %s)", self.meter_label, info.version)
        return info

    def wait_for_connection(self, all_signals: bool = False, timeout: float | None = None) -> None:
        self.connect()

    def close(self) -> None:
        """Stop a running fly (keeping what it received), then close the connection."""
        self._stop_and_wait("close")
        with self._client_lock:
            self._close_broker()
            self._close_client()
        self.link_state._update("disconnected")

    def _close_client(self) -> None:
        client = self._client
        if client is None:
            return
        self._client = None
        if self._unsubscribe_events is not None and client.connected:
            try:
                self._unsubscribe_events()
            except Exception as exc:  # closing anyway
                logger.debug("%s: unsubscribe: %s", self.meter_label, exc)
        self._unsubscribe_events = None
        client.close()

    def _close_broker(self) -> None:
        broker, self._own_broker = self._own_broker, None
        client = self._client
        if broker is None or client is None:
            return
        if client.in_loop_thread():  # closing from a callback: let the loop finish it
            client.loop.create_task(broker.close())
            return
        try:
            client.run(broker.close(), "close the MQTT broker connection")
        except Exception as exc:  # closing anyway
            logger.warning("%s: closing %s: %s", self.meter_label, broker.label, exc)

    def _on_client_event(self, event: ClientEvent) -> None:
        """On the loop: the link's state for suspenders (``meter.link_state``)."""
        self.link_state._update("lost" if isinstance(event, ConnectionLost) else "connected")

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
            "emulated": self.emulated,
            "smartmeter_ophyd": __version__,
            "fly": self._fly_config.as_dict() if self._fly_config else None,
            "mqtt_broker": self._broker_label(),
        }

    # ------------------------------------------------------------------ stage / read

    def stage(self) -> list[Any]:
        self.connect()
        return super().stage()  # type: ignore[no-any-return]

    def unstage(self) -> list[Any]:
        """Stop a running fly and wait until the meter is idle and the file closed.

        The stream declaration ends with the staging: the next run declares it anew."""
        self._stop_and_wait("unstage: the run ended while the fly ran")
        self._declared = False
        return super().unstage()  # type: ignore[no-any-return]

    def trigger(self) -> DeviceStatus:
        """Fetch every reading (status fails with MeterBusyError while sampling, §2.8)."""
        client = self.client.async_client

        async def fetch() -> None:
            voltage = await client.get_voltage()
            self.voltage._update(list(voltage.values))
            current = await client.get_current()
            self.current._update(list(current.values))
            power = await client.get_power()
            now = time.time()
            self.active_power._update(list(power.active), now)
            self.total_active_power._update(float(sum(power.active)), now)
            self.reactive_power._update(list(power.reactive), now)
            self.apparent_power._update(list(power.apparent), now)
            self.energy._update(list((await client.get_energy()).energy))
            self.frequency._update(list((await client.get_frequency()).values))
            self.phase_angle._update(list((await client.get_phase_angle()).values))

        self._discard_leftovers("trigger")
        return status_from_coroutine(self, self.client, fetch())

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

    @property
    def fly_config(self) -> FlyConfig:
        """The settings the next/current fly uses (prepared, else the local signals)."""
        return self._fly_config or self._local_fly_config()

    @property
    def samples_received(self) -> int:
        """Samples the client received in the current or last fly (0 before the first)."""
        controller = self._controller
        if controller is None or controller.session is None:
            return 0
        return controller.session.received_samples

    @property
    def flying(self) -> bool:
        """Whether a fly is armed or running (the meter may be sampling)."""
        return self._controller is not None and self._controller.running

    def prepare(self, value: FlyConfig | Mapping[str, Any]) -> DeviceStatus:
        """Validate the next fly's settings and, for a scheduled or plan-released start, arm.

        Everything is checked before anything is sent: the settings (codec rules, §4.1), a
        ``start_time`` against the 0.5..20 s window by the host clock (§6.4), the data
        directory.  With ``start_time`` or ``release="plan"`` the status finishes when the
        meter accepted ``sample`` (for a scheduled start its reply carries
        ``startTs == "<start_time>.000"``) and fails with the meter's own message; otherwise
        the settings are only stored and ``kickoff`` sends ``sample``.
        """
        config = FlyConfig.from_value(value, self.meter_label)
        check_not_running(self._controller, self.meter_label, "prepare")
        if config.start_time is not None:
            try:
                check_start_window(config.start_time, time.time())
            except CommandError as exc:
                raise MeterCommandError(self.meter_label, f"prepare: {exc}") from exc
        self._check_data_directory()
        self._discard_leftovers("prepare")
        self._fly_config = config
        self.sampling_rate.put(config.rate)
        self.measures.put(config.measures)
        self.transport.put(config.transport)
        self.sample_prefix.put(config.prefix)
        self.flow_control.put(config.flow_control)
        if not config.arms_in_prepare:
            status = DeviceStatus(self, call_stop_on_failure=False)
            status.set_finished()
            return status
        controller = self._new_controller(config)
        return status_from_coroutine(self, self.client, self._arm(controller))

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        from ..storage import stream_data_keys

        self._declared = True
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
        """Start (or release an armed) fly; done when the meter really sampled.

        Under a RunEngine the stream must have been declared (``bps.declare_stream(meter,
        name=meter.name, collect=True)``): ``bluesky.plans.fly`` cannot record this flyer, and
        is refused here before the meter starts.
        """
        config = self.fly_config
        if not self._declared and _called_by_run_engine():
            raise MeterCommandError(
                self.meter_label,
                "kickoff: this flyer's stream was not declared.  Use plans.synchronized_fly "
                "(or declare it: bps.declare_stream(meter, name=meter.name, collect=True) "
                "before kickoff); bluesky.plans.fly cannot record stream-asset flyers",
            )
        controller = self._controller
        if controller is not None and controller.running:
            if self._complete_status is None:
                self._complete_status = self._watch_outcome(controller, config)
            return status_from_coroutine(self, self.client, controller.kickoff())
        check_not_running(controller, self.meter_label, "kickoff")
        self._check_data_directory()
        self._discard_leftovers("kickoff")
        controller = self._new_controller(config)
        self._complete_status = self._watch_outcome(controller, config)

        async def start() -> None:
            await self._arm(controller)
            await controller.kickoff()

        return status_from_coroutine(self, self.client, start())

    def complete(self) -> ProgressStatus:
        """Status done when the meter stopped and every sample is accounted for."""
        if self._complete_status is None:
            raise MeterCommandError(self.meter_label, "complete: kickoff() was not called")
        return self._complete_status

    def stop(self, *, success: bool = False) -> None:
        """Ask a running fly to stop the meter (it drains the tail and closes the file)."""
        controller = self._controller
        client = self._client
        if controller is None or not controller.running or client is None:
            return
        reason = ("stop() called: the plan or the RunEngine ended the fly early (RE.abort, "
                  "RE.stop, Ctrl-C, or a failure elsewhere in the plan)")
        client.loop.call_soon_threadsafe(controller.request_stop, reason)

    def pause(self) -> None:
        """bluesky's pause (Ctrl-C twice, ``RE.request_pause()``): stop the meters, keep
        everything received (the run goes on only as a new fly)."""
        self._stop_and_wait("pause")

    def resume(self) -> None:
        """Nothing to undo: a paused fly has ended; the plan decides whether to fly again."""

    def _stop_and_wait(self, why: str) -> None:
        controller = self._controller
        client = self._client
        if controller is None or not controller.running or client is None:
            return
        if client.in_loop_thread():
            controller.request_stop(why)
            return
        client.loop.call_soon_threadsafe(controller.request_stop, why)
        future = asyncio.run_coroutine_threadsafe(controller.wait(), client.loop)
        try:
            future.result(self.timeout * 4 + 5)
        except concurrent.futures.TimeoutError:
            logger.error("%s: %s: the fly did not end within %.0f s", self.meter_label, why,
                         self.timeout * 4 + 5)
        except Exception as exc:  # the fly's own failure is reported by complete()
            logger.info("%s: %s: the fly ended with %s", self.meter_label, why, exc)

    # ------------------------------------------------------------------ fly internals

    def _check_data_directory(self) -> None:
        directory = self.data_directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MeterCommandError(
                self.meter_label, f"data_directory {directory} cannot be created: {exc}"
            ) from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise MeterCommandError(
                self.meter_label, f"data_directory {directory} is not writable"
            )
        self._check_readable()

    def _check_readable(self) -> None:
        roots = self.readable_roots
        resolved = self.data_directory.resolve()
        if roots and not any(resolved.is_relative_to(root.resolve()) for root in roots):
            raise MeterCommandError(
                self.meter_label,
                f"data_directory {self.data_directory} is outside the catalog's readable "
                f"storage ({', '.join(map(str, roots))}): the run could not be read back",
            )

    def _discard_leftovers(self, why: str) -> None:
        """Forget documents of a previous fly that no run collected (they stay in its file)."""
        assets = self._assets
        if assets is None or self.flying:
            return
        left = assets.get_index() - assets.emitted
        if left > 0:
            logger.warning(
                "%s: %s: %d samples of the previous fly were never collected into a run; they "
                "stay in %s", self.meter_label, why, left, self.hdf5_path,
            )
        self._assets = self._gap_assets = None

    def _new_controller(self, config: FlyConfig) -> FlyController:
        if not self.connected:
            self.connect()
        client = self.client
        self._fly_config = config
        self.last_summary = None
        self.last_flow_stats = None
        self._complete_status = None
        self._writer = self._assets = self._gap_assets = None
        self.timing_stream.reset()
        silence = self.timeout * 4
        self.last_stop_reason = None

        async def build() -> FlyController:
            fly_client: AsyncMeterClient | AsyncMqttMeter = client.async_client
            if coerce_transport(config.transport) is Transport.MQTT:
                fly_client = await self._mqtt_meter()
            return FlyController(
                client=fly_client,  # type: ignore[arg-type]  # the part of a client a fly uses
                config=config, open_writer=self._open_writer,
                cts_policy=self.cts_policy, silence_s=silence,
                on_progress=self._report_progress, on_log=self.timing_stream.feed,
                live=self.live_stream, sync_records=self.timing_stream.records_with_rtc,
                rtc=bool(self.rtc.get()),
            )

        # an MQTT fly may connect to the broker first (bounded by the broker's own timeout)
        controller = client.submit(build()).result(2 * self.timeout + 1)
        self._controller = controller
        return controller

    def _broker_address(self) -> tuple[str, int]:
        """Where this host reaches the broker of MQTT flies (see the class docstring)."""
        spec = self.mqtt_broker
        if isinstance(spec, tuple):
            return spec
        if isinstance(spec, str):
            return spec, MQTT_PORT
        if spec is not None:
            broker = spec.async_broker
            return broker.host, broker.port
        server = self.mqtt_server.get()
        if not server or server == "-":
            raise MeterCommandError(
                self.meter_label,
                f"transport MQTT: the meter has no MQTT server (mqttServer {server!r}, §3.3, "
                "§8.1); set meter.mqtt_server, or pass SmartMeter(..., mqtt_broker=(host, port))",
            )
        return server, MQTT_PORT

    def _broker_label(self) -> str | None:
        """``host:port`` of the broker the current/last fly used (None: not an MQTT fly)."""
        config = self._fly_config
        if config is None or coerce_transport(config.transport) is not Transport.MQTT:
            return None
        try:
            host, port = self._broker_address()
        except MeterCommandError:
            return None
        return f"{host}:{port}"

    async def _mqtt_meter(self) -> AsyncMqttMeter:
        """On the loop: this meter on the MQTT broker, by its name (its topics, §8.2)."""
        from ..client import AsyncMqttBroker  # aiomqtt: only MQTT flies need it

        info = self.client.info
        if info is None or not info.name:
            raise MeterCommandError(self.meter_label, "transport MQTT: the meter's name (its "
                                    "MQTT topics, §8.2) is not known; connect first")
        spec = self.mqtt_broker
        if spec is not None and not isinstance(spec, str | tuple):
            return spec.async_broker.meter(info.name, timeout=self.timeout)
        host, port = self._broker_address()
        broker = self._own_broker
        if broker is not None and ((broker.host, broker.port) != (host, port)
                                   or not broker.connected):
            self._own_broker = None
            await broker.close()
            broker = None
        if broker is None:
            try:
                broker = AsyncMqttBroker(host, port, timeout=self.timeout)
            except RuntimeError as exc:  # aiomqtt is not installed (the mqtt extra)
                raise MeterCommandError(self.meter_label, f"transport MQTT: {exc}") from exc
            try:
                await broker.connect()
            except MeterError as exc:
                await broker.close()
                origin = ("the meter's mqtt_server setting, port 1883 (§8.1)"
                          if self.mqtt_broker is None else "mqtt_broker")
                raise MeterConnectionError(
                    self.meter_label,
                    f"transport MQTT: cannot reach the broker {host}:{port} ({origin}): "
                    f"{getattr(exc, 'detail', exc)}; if this host reaches it under another "
                    "address or port, pass SmartMeter(..., mqtt_broker=(host, port))",
                ) from exc
            self._own_broker = broker
        return broker.meter(info.name, timeout=self.timeout)

    async def _arm(self, controller: FlyController) -> None:
        reply = await controller.arm()
        self.last_sample_reply = reply
        self.sampling_reply._update(json.dumps(jsonable(reply.raw_fields)))

    def _report_progress(self, samples: int) -> None:
        status = self._complete_status
        if status is not None and not status.done:
            status.report(samples)

    def _watch_outcome(self, controller: FlyController, config: FlyConfig) -> ProgressStatus:
        status = ProgressStatus(self, target=config.target_samples)
        client = self.client

        async def finished() -> None:
            outcome = await controller.wait()
            self.timing_stream.flush()
            self.last_summary = outcome.summary
            self.last_flow_stats = outcome.flow_stats
            self.last_stop_reason = controller.stop_reason
            if outcome.summary is not None:
                self.stop_summary._update(json.dumps(controller.stop_record(outcome.summary)))
            status.report(outcome.samples_written)
            if outcome.error is not None:
                logger.warning("%s: fly failed: %s", self.meter_label, outcome.error)
                raise outcome.error
            summary = outcome.summary
            assert summary is not None
            logger.info("%s: fly complete: %s", self.meter_label, "; ".join(summary.notes))

        status_from_coroutine(self, client, finished(), status=status)
        status.add_callback(lambda _st: self._after_fly())
        return status

    def _after_fly(self) -> None:
        """Refresh the info line once the fly is over (state, identity), off the loop."""
        client = self._client
        if client is None or not client.connected:
            return

        async def refresh() -> None:
            try:
                info = await client.async_client.get_info()
            except MeterError as exc:
                logger.warning("%s: could not refresh the info line after the fly: %s",
                               self.meter_label, exc)
                return
            self._apply_info(info)

        client.submit(refresh())

    def _open_writer(self, reply: SampleReply) -> WaveformWriter:
        """Runs on the I/O thread once the sample reply is known."""
        from ..storage import GapAssets, StreamAssets, WaveformWriter

        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.data_directory / f"{safe_file_stem(self.name)}-{stamp}-{uuid.uuid4().hex[:8]}.h5"
        start_ts = reply.start_ts if reply.start_ts is not None else 0.0
        if not start_ts:
            logger.warning(
                "%s: the meter reported startTs %r (no NTP sync yet, §6.1); sample times "
                "in %s count from 0", self.meter_label, reply.start_ts, path,
            )
        info = self._client.info if self._client is not None else None
        writer = WaveformWriter(
            path, reply.measures, reply.sampling_rate, start_ts,
            {
                "name": (info.name if info else None) or self.name,
                "host": f"{self.host}:{self.port}",
                "firmware": info.version if info else None,
                "compiled": info.compiled if info else None,
                "emulated": self.emulated,
                "smartmeter_ophyd": __version__,
                "sampling_reply": jsonable(reply.raw_fields),
            },
        )
        self._writer = writer
        self._assets = StreamAssets(writer, self.name, source_label=self.source_label)
        self._gap_assets = GapAssets(writer, self.name, source_label=self.source_label)
        return writer


def _called_by_run_engine() -> bool:
    """Whether the caller runs inside an event loop (the RunEngine's), not plain code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def safe_file_stem(name: str) -> str:
    """A file-name stem from a device or meter name: no separators, no leading dots."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return stem or "meter"


def _checked_broker(
    value: MqttBroker | str | tuple[str, int] | None, name: str
) -> MqttBroker | str | tuple[str, int] | None:
    """``mqtt_broker`` as given, or a ValueError naming the meter (nothing is connected)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() and value != "-":
            return value
    elif isinstance(value, tuple | list):
        if (len(value) == 2 and isinstance(value[0], str) and value[0].strip()
                and isinstance(value[1], int) and not isinstance(value[1], bool)
                and 0 < value[1] < 65536):
            return (value[0], value[1])
    elif hasattr(value, "async_broker"):  # an open client MqttBroker, shared
        return value
    raise ValueError(
        f"smartmeter {name}: mqtt_broker={value!r} is not usable; give None (the meter's own "
        "mqtt_server, port 1883), a host, (host, port) with 0 < port < 65536, or an MqttBroker"
    )
