"""One emulated SmartMeter (firmware 2.2) on real sockets: lifecycle, main loop, logs, sampling.

The meter runs the firmware's loop as one asyncio task: every ~25 ms it polls connections
(accepts and disconnects only every 100 ms, §2.1), handles one command line per connection
(§2.2), then either the idle duties (lifeness, port-54322 clients, scheduled start, stream
server dial-out, energy bookkeeping; §2.6, §6.4, §7) or the sampling duties (move samples
from the :class:`SamplingEngine` into the ring buffer and out as chunks, per-second rate
log; §4.5–§4.7).  A blocking firmware call (NTP, the scheduled-start busy wait) is awaited
inside that task, so it stalls this meter exactly as it stalls the ESP, and nothing else.

Commands live in :mod:`._commands` (a table), texts in :mod:`._texts`, sinks in
:mod:`._sinks`, persistence in :mod:`._state`.  Deliberate deviations are listed in the
package docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smartmeter_ophyd.protocol import (
    CRLF,
    FRAME_HEADER_SIZE,
    RING_BUFFER_BYTES,
    LogLevel,
    Transport,
    encode_frame,
    encode_frames,
    encode_log_line,
    encode_plain_line,
    encode_reply,
    format_long_time,
    format_short_time,
    format_timestamp,
    parse_input_line,
)

from . import _texts as texts
from ._clock import MeterClock, NetworkModel, SntpResult, sntp_sync
from ._commands import handle_line
from ._control import ControlServer
from ._endpoints import Endpoint, SerialEndpoint, TcpEndpoint
from ._grid import GridModel
from ._model import Faults, PendingStart, SampleSettings, Session
from ._mqtt import MeterMqtt
from ._sampling import RingBuffer, SamplingEngine, SessionTruth, SyncRecord
from ._sinks import DatagramFault, EndpointSink, MqttSink, Sink
from ._state import StateStore, StoredConfig

logger = logging.getLogger(__name__)

MAX_CLIENTS = 3
ACCEPT_POLL_S = 0.1
LIFENESS_S = 1.0
ENERGY_STORE_S = 19.0
SCHEDULE_BUSY_WAIT_S = 0.2
SCHEDULE_EARLY_S = 0.001
"""A scheduled start begins ≈1 ms before the requested second (§6.4)."""
CORRECT_SAMPLING_THRESHOLD_S = 0.009
MAX_CORRECT_SAMPLES = 10
DIAL_TIMEOUT_S = 0.5


@dataclass
class EmulatorConfig:
    """How to build one emulated meter.  Ports 0 = ephemeral (chosen at first boot, kept after)."""

    name: str = texts.DEFAULT_NAME
    """Initial device name (a state file, if present, wins)."""
    host: str = "127.0.0.1"
    command_port: int = 0
    stream_port: int = 0
    state_path: Path | None = None
    """JSON file for the persisted configuration; None keeps it in memory (per instance)."""
    rtc: bool = True
    clock_offset_s: float = 0.0
    """Error of the ESP's software clock at start (the boot NTP sync usually erases it)."""
    drift_ppm: float = 0.0
    """Drift of the ESP32 crystal: the NTP-set software clock (``startTs``, log times, §6.5
    durations), ``micros()`` of the rate log (§4.7) and the latched-mode timer (§4.11)."""
    ade_drift_ppm: float = 0.0
    """Drift of the ADE9000 crystal: the waveform sample clock (§4.3)."""
    rtc_drift_ppm: float = 0.0
    """Drift of the DS3231 RTC (about +-2 ppm): the per-second counter reset (§4.10)."""
    network_delay_s: float = 0.0005
    network_jitter_s: float = 0.0
    time_server: str | None = None
    """Overrides the stored time server at start (tests point it at a local NTP server)."""
    ntp_port: int = 123
    mqtt_server: str | None = None
    """Overrides the stored MQTT server at start (tests point it at a local broker, §8.1)."""
    mqtt_port: int = 1883
    """Broker port (the firmware always uses 1883; tests run the broker on a free port)."""
    mqtt_status_s: float = 5.0
    """Period of the idle MQTT status (MQTT_UPDATE_INTERVAL, §8.2)."""
    mdns: bool = False
    """Announce ``_elec._tcp`` on ``host`` with python-zeroconf (§9; see ``_mdns``)."""
    boot_delay_s: float = 0.5
    grid_seed: int = 0
    circuit: int = 0
    noise_seed: int = 0
    ip: str | None = None
    """Address the meter reports as its own (``ip`` in info/stop); default ``host``."""
    ring_buffer_bytes: int = RING_BUFFER_BYTES
    stream_server_port: int = 54322
    stream_server_period_s: float = 30.0
    serial: bool = True
    """Open a pseudo-terminal as the USB serial port."""
    control_port: int | None = None
    """Port of the JSON-lines control channel; None = no control server."""
    keep_truth: bool = True
    tick_s: float = 0.025
    corrupt_cmd_echo: bool = False
    """§2.9: echo a fragment of the reply text as ``cmd`` where the firmware corrupts it."""
    seed: int = 0
    """Seed of the emulator's own randomness (the scheduled start's 0–199 ms wait)."""


@dataclass
class Truth:
    """Ground truth of the current or last session, as the control channel reports it."""

    active: bool
    true_start: float
    meter_start_ts: float
    reported_start_ts: str
    clock_offset_s: float
    drift_ppm: float
    rate: int
    measures: str
    samples_produced: int
    sent_samples: int
    packets: int
    values: np.ndarray = field(repr=False)
    ade_drift_ppm: float = 0.0
    rtc_drift_ppm: float = 0.0
    n_fillers: int = 0
    """RTC filler rows in the stream (§4.10)."""
    n_duplicates: int = 0
    """Rows duplicated by positive §6.5 corrections."""
    n_correction_drops: int = 0
    """Samples dropped by negative §6.5 corrections."""
    n_rtc_drops: int = 0
    """ADE samples refused by the per-second counter (§4.10; uniform rates)."""
    rtc_interrupts: int = 0
    """RTC seconds handled in the session (``SecondInterrupts``, §6.5)."""


class EmulatedMeter:
    """A firmware-2.2-faithful SmartMeter on real sockets (several per event loop)."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        grid: GridModel | None = None,
        clock: MeterClock | None = None,
    ) -> None:
        self.config = config or EmulatorConfig()
        cfg = self.config
        self.grid = grid or GridModel(seed=cfg.grid_seed)
        self.clock = clock or MeterClock(cfg.clock_offset_s, cfg.drift_ppm)
        self.network = NetworkModel(cfg.network_delay_s, cfg.network_jitter_s, seed=cfg.seed)
        self.store = StateStore(cfg.state_path, StoredConfig(name=cfg.name))
        if cfg.time_server is not None:
            self.store.config.time_server = cfg.time_server
            self.store.save()
        if cfg.mqtt_server is not None:
            self.store.config.mqtt_server = cfg.mqtt_server
            self.store.save()
        self.ip = cfg.ip or (cfg.host if cfg.host not in ("", "0.0.0.0", "::") else "127.0.0.1")
        self.ring = RingBuffer(cfg.ring_buffer_bytes)
        self.faults = Faults()
        self._rng = random.Random(cfg.seed)
        self.serial: SerialEndpoint | None = None
        self.clients: list[TcpEndpoint | None] = [None] * MAX_CLIENTS
        self._pending_accepts: deque[TcpEndpoint] = deque()
        self._raw_pending: deque[TcpEndpoint] = deque()
        self._command_server: asyncio.Server | None = None
        self._stream_server: asyncio.Server | None = None
        self.datagrams: asyncio.DatagramTransport | None = None
        self._command_port = cfg.command_port
        self._stream_port = cfg.stream_port
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reboot_requested = False
        self.ready = asyncio.Event()
        self.boot_count = 0
        self.last_sntp: SntpResult | None = None
        self.ntp_history: list[SntpResult] = []
        """Ground truth of every successful SNTP sync since construction (true instant,
        true clock error after it, confidence, round trip), oldest first."""
        self.last_engine: SamplingEngine | None = None
        self.last_session: Session | None = None
        self.control: Any = None
        self._reset_volatile()
        self.mqtt = MeterMqtt(self)
        self.mdns: Any = None

    # ------------------------------------------------------------------ public properties
    @property
    def name(self) -> str:
        return self.store.config.name

    @property
    def stored(self) -> StoredConfig:
        return self.store.config

    @property
    def command_port(self) -> int:
        return self._command_port

    @property
    def stream_port(self) -> int:
        return self._stream_port

    @property
    def serial_path(self) -> str | None:
        return self.serial.path if self.serial is not None else None

    @property
    def control_port(self) -> int | None:
        return self.control.port if self.control is not None else None

    @property
    def sampling(self) -> bool:
        return self.session is not None

    def describe(self) -> dict[str, Any]:
        """One machine-readable line per meter (the CLI prints it)."""
        return {
            "name": self.name,
            "host": self.config.host,
            "command_port": self.command_port,
            "stream_port": self.stream_port,
            "control_port": self.control_port,
            "serial": self.serial_path,
        }

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the sockets, boot (incl. NTP) and run until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        if self.config.serial and self.serial is None:
            self.serial = SerialEndpoint()
            self.serial.attach(loop)
            self.serial.on_input = self._wake.set
        if self.config.control_port is not None and self.control is None:
            self.control = ControlServer(self, self.config.host, self.config.control_port)
            await self.control.start()
        await self._boot()
        if self.config.mdns and self.mdns is None:
            from ._mdns import MdnsAnnouncer

            self.mdns = MdnsAnnouncer(self)
            self.mdns.announce()
        self._task = loop.create_task(self._lifecycle(), name=f"meter {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.mqtt.stop()
        await self._shutdown()
        if self.mdns is not None:
            await self.mdns.close()
            self.mdns = None
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        if self.control is not None:
            await self.control.stop()
            self.control = None

    async def __aenter__(self) -> EmulatedMeter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def request_reboot(self) -> None:
        """restart/factoryReset/overflow: drop everything, come back after the boot delay."""
        self._reboot_requested = True
        self._wake.set()

    async def _lifecycle(self) -> None:
        while True:
            await self._main_loop()
            await self._shutdown()
            await asyncio.sleep(self.config.boot_delay_s)
            await self._boot()

    def _reset_volatile(self) -> None:
        self.sample_settings = SampleSettings()
        self.decimation_rate = 8000
        self.session: Session | None = None
        self.pending_start: PendingStart | None = None
        self.time_valid = False
        self.busy_ip: str | None = None
        self.boot_true = time.monotonic()
        self._last_poll = 0.0
        self._last_lifeness = time.monotonic()
        self._last_energy_store = time.monotonic()
        self._ade_energy_since = time.time()
        self._last_daily_check_minute: tuple[int, int] | None = None
        self._last_dial = float("-inf")
        self._dial_endpoint: TcpEndpoint | None = None
        self._dial_failed_logged = False
        self.ade_registers: dict[int, int] = {0x4FE: 0x0FE0, 0x420: 0x0000}
        self.last_getter: Endpoint | None = None
        """``newGetter``: the last connection that sent a command (MQTT commands act on it, §8.3)."""

    async def _open_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.config.host
        self._command_server = await asyncio.start_server(
            self._on_command_connect, host, self._command_port
        )
        self._command_port = self._command_server.sockets[0].getsockname()[1]
        self._stream_server = await asyncio.start_server(
            self._on_stream_connect, host, self._stream_port
        )
        self._stream_port = self._stream_server.sockets[0].getsockname()[1]
        self.datagrams, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(host, 0)
        )

    async def _boot(self) -> None:
        """setup(): network up, NTP (blocking), MQTT attempt, stream server, ``Setup done``."""
        self._reset_volatile()
        self._reboot_requested = False
        self.boot_count += 1
        if self.serial is not None:
            self.serial.reset_session()
        self.ring = RingBuffer(self.config.ring_buffer_bytes)
        self.engine = self._new_engine()
        await self._open_sockets()
        self._flash_row(f"{self.short_time()}: {texts.BOOT_ROW}")
        self.log(LogLevel.ALL, texts.NETWORK_CONNECTED)
        self.log(LogLevel.ALL, texts.IP_LOG.format(ip=self.ip))
        self.log(LogLevel.INFO, texts.MDNS_LOG.format(name=self.name))  # initMDNS (§9)
        await self.ntp_sync()
        await self.mqtt.begin()  # one blocking attempt; a failure is logged (§8.1)
        if self.stored.stream_server != texts.UNSET:
            self.log(LogLevel.INFO, texts.STREAM_TRY.format(server=self.stored.stream_server))
        self.log(LogLevel.ALL, texts.SETUP_DONE)
        self._ade_energy_since = self.clock.true_now()
        self.ready.set()
        logger.info("meter %s booted (boot #%d)", self.name, self.boot_count)

    async def _shutdown(self) -> None:
        """Everything a reboot loses: sockets, sessions, pending connections."""
        self.ready.clear()
        self.mqtt.drop()  # no DISCONNECT, no "off": the ESP just restarts
        self.end_session()  # also closes a raw-stream client
        for server in (self._command_server, self._stream_server):
            if server is not None:
                server.close()
        for ep in [*self.clients, *self._pending_accepts, *self._raw_pending, self._dial_endpoint]:
            if ep is not None:
                ep.close(abort=True)
        for server in (self._command_server, self._stream_server):
            if server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 1.0)
        self._command_server = self._stream_server = None
        self.clients = [None] * MAX_CLIENTS
        self._pending_accepts.clear()
        self._raw_pending.clear()
        if self.datagrams is not None:
            self.datagrams.close()
            self.datagrams = None

    # -------------------------------------------------------------------- connections
    async def _on_command_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._pending_accepts.append(TcpEndpoint(reader, writer))

    async def _on_stream_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._raw_pending.append(TcpEndpoint(reader, writer, log_level=None))
        self._wake.set()

    def _poll_connections(self) -> None:
        """The 100 ms tick (§2.1): detect disconnects, accept at most one new client."""
        for i, ep in enumerate(self.clients):
            if ep is not None and not ep.alive:
                self.clients[i] = None
                ep.close()
                self.log(LogLevel.INFO, texts.CLIENT_DISCONNECTED.format(ip=ep.peer_ip, port=ep.peer_port))
        if self._pending_accepts:
            self.add_client(self._pending_accepts.popleft())

    def add_client(self, ep: TcpEndpoint) -> None:
        """onClientConnect (§2.1): log to the others, take a slot, send the info line."""
        free = [i for i, c in enumerate(self.clients) if c is None]
        if not free:
            self.log(LogLevel.INFO, texts.TOO_MANY_CLIENTS)
            ep.close()
            return
        self.log(LogLevel.INFO, texts.CLIENT_CONNECTED.format(ip=ep.peer_ip, port=ep.peer_port))
        self.clients[free[0]] = ep
        ep.on_input = self._wake.set
        ep.write(encode_reply(self.info_fields()))
        ep.start_reading()

    # -------------------------------------------------------------- fault injection
    def stall_output(self, seconds: float) -> None:
        """Fault: the main loop blocks for ``seconds`` (as a stuck ESP loop would)."""
        self.faults.stall_s = seconds
        self._wake.set()

    def inject_garbage(self, data: bytes) -> None:
        """Fault: ``data`` is written just before the next data frame."""
        self.faults.garbage += data

    def inject_log_in_next_frame(self, text: str) -> None:
        """Fault: an INFO log line lands in the middle of the next data frame (§4.6)."""
        self.faults.log_in_frame = text

    def move_next_logs_into_frames(self, count: int) -> None:
        """Fault: the meter's own next ``count`` log lines to the sampling connection are
        written inside data frames instead of between them (§4.6: background tasks such as
        NTP can log while a frame is being written)."""
        self.faults.logs_into_frames += count

    def drop_udp_datagrams(self, count: int) -> None:
        """Fault: the next ``count`` UDP datagrams are lost."""
        self.faults.drop_datagrams += count

    def duplicate_udp_datagrams(self, count: int) -> None:
        """Network fault: each of the next ``count`` UDP datagrams arrives twice."""
        self.faults.duplicate_datagrams += count

    def reorder_udp_datagrams(self, count: int) -> None:
        """Network fault: each of the next ``count`` UDP datagrams arrives just after the
        datagram that follows it (``count`` swapped pairs)."""
        self.faults.reorder_datagrams += count

    def drop_connections(self) -> None:
        """Fault: every TCP connection dies at once (command clients and the raw stream)."""
        for ep in self.clients:
            if ep is not None:
                ep.close(abort=True)
        if self.session is not None and self.session.raw_stream:
            sink = self.session.sink
            if isinstance(sink, EndpointSink):
                sink.endpoint.close()
        self._wake.set()

    @property
    def raw_stream_pending(self) -> bool:
        """A client waits on the raw stream port (§7.1; what ``type:"FFMPEG"`` needs, §7.3)."""
        return bool(self._raw_pending)

    def endpoints(self) -> list[Endpoint]:
        eps: list[Endpoint] = []
        if self.serial is not None:
            eps.append(self.serial)
        eps.extend(c for c in self.clients if c is not None)
        return eps

    # ---------------------------------------------------------------------------- time
    def meter_unix(self) -> float:
        """The meter's unix time, 0 before the first NTP success of this boot (§6.1)."""
        return self.clock.now() if self.time_valid else 0.0

    def _human_time(self) -> tuple[float, bool]:
        if self.time_valid:
            return self.clock.now(), True
        if self.config.rtc:  # the RTC keeps UTC+1 without DST (§6.1)
            return self.clock.now(), False
        return time.monotonic() - self.boot_true, False

    def short_time(self) -> str:
        t, dst = self._human_time()
        return format_short_time(t, dst)

    def long_time(self, unix_s: float | None = None) -> str:
        if unix_s is None:
            t, dst = self._human_time()
            return format_long_time(t, dst)
        return format_long_time(unix_s, self.time_valid)

    def timestamp(self, meter_s: float | None = None) -> str:
        if not self.time_valid:
            return format_timestamp(0.0)
        return format_timestamp(self.clock.now() if meter_s is None else meter_s)

    async def ntp_sync(self, *, background: bool = False) -> SntpResult | None:
        """NTP with the stored time server (§6.2); during sampling: §6.5 record and correction.

        ``background`` (``ntp`` with ``bg:true``, §3.7): the sync runs on the ESP's other core,
        which does not set the RTC.  Otherwise a success writes the RTC, which restarts its
        seconds (see ``_sampling``) and so moves the per-second counter of a running session.
        """
        if self.session is not None:
            self._produce(self.session)
        result = await sntp_sync(
            self.clock, self.stored.time_server, self.config.ntp_port, self.network
        )
        if result is None:
            return None
        self.time_valid = True
        self.last_sntp = result
        self.ntp_history.append(result)
        self.log(LogLevel.INFO, texts.NTP_SYNCED_LOG.format(conf=result.confidence_ms))
        s = self.session
        if s is not None:
            # The device kept sampling during the exchange (§6.5): count up to now.
            if not self._produce(s):
                return result
            self._correct_sampling(s)
            if not background and self._produce(s):
                s.engine.reset_rtc(s.engine.produced_until)
        return result

    def _correct_sampling(self, s: Session) -> None:
        """§6.5 onSamplingInfo: compare the sample count with the NTP-corrected duration.

        As the firmware computes it: the duration in whole milliseconds between the ``From``
        and ``To`` stamps, ``goal`` a float32 product truncated to an integer, the offset
        ``(goal - total) / rate``; a correction is queued at |offset| >= 9 ms.
        """
        engine = s.engine
        rate = s.settings.rate
        total = engine.samples_produced
        true_now = self.clock.true_now()
        now_text = self.timestamp()
        start_s, start_ms = (int(x) for x in s.start_ts_text.split("."))
        now_s, now_ms = (int(x) for x in now_text.split("."))
        duration_ms = (now_s - start_s) * 1000 + (now_ms - start_ms)
        if duration_ms <= 0:
            return
        duration = float(np.float32(duration_ms / 1000.0))
        goal = int(np.float32(duration) * np.float32(rate)) & 0xFFFFFFFF
        offset = float(np.float32(goal - total) / np.float32(rate))
        level = LogLevel.WARNING if abs(offset) > 0.02 else LogLevel.INFO
        self.log(LogLevel.INFO, texts.AFTER_NTP_RATE.format(rate=float(np.float32(total / duration))))
        self.log(level, texts.SHOULD_BE.format(goal=goal, total=total))
        self.log(level, texts.OFFSET_OF.format(offset=offset, seconds=engine.rtc_interrupts,
                                               duration=duration))
        self.log(LogLevel.INFO, texts.FROM_TS.format(ts=s.start_ts_text))
        self.log(LogLevel.INFO, texts.TO_TS.format(ts=now_text))
        queued = 0
        if abs(offset) >= CORRECT_SAMPLING_THRESHOLD_S:
            queued = max(-MAX_CORRECT_SAMPLES, min(MAX_CORRECT_SAMPLES, goal - total))
            engine.queue_correction(queued)
            self.log(LogLevel.WARNING, texts.CORRECTING.format(n=queued))
        engine.record_sync(SyncRecord(true_now, goal, total, offset, duration, queued))

    # ----------------------------------------------------------------------------- logs
    def log(self, level: LogLevel, text: str) -> None:
        """MultiLogger::log: to every attached logger whose level admits it (§2.4)."""
        line = encode_log_line(level, self.short_time(), text)
        sink = self.session.sink if self.session is not None else None
        for ep in self.endpoints():
            if ep.log_level is not None and level >= ep.log_level:
                if (
                    self.faults.logs_into_frames > 0
                    and isinstance(sink, EndpointSink)
                    and sink.endpoint is ep
                ):
                    self.faults.logs_into_frames -= 1
                    self.faults.held_logs.append(line)  # written inside the next frame (§4.6)
                    continue
                ep.write(line)
        if level >= LogLevel.WARNING:
            self._flash_row(line[:-2].decode("utf-8", "replace"))

    def _flash_row(self, row: str) -> None:
        self.stored.append_log_row(row)
        self.store.save()

    def info_fields(self) -> dict[str, Any]:
        """The info message, keys in the firmware's order (§2.5)."""
        c = self.stored
        daily = "None" if c.reset_hour < 0 else f"@{c.reset_hour:02d}:{c.reset_minute:02d}:00"
        energy = "[{:.4f}, {:.4f}, {:.4f}]".format(*c.energy_wh)
        return {
            "cmd": "info",
            "type": texts.DEVICE_TYPE,
            "version": texts.VERSION,
            "compiled": texts.COMPILED,
            "sys_time": self.long_time(),
            "name": c.name,
            "ip": self.ip,
            "mqtt_server": c.mqtt_server,
            "stream_server": c.stream_server,
            "time_server": c.time_server,
            "sampling_rate": self.sample_settings.rate,
            "buffer_size": self.config.ring_buffer_bytes,
            "psram": True,
            "rtc": self.config.rtc,
            "state": "busy" if self.session is not None else "idle",
            "energy": energy,
            "dailyReset": daily,
            "calibration": [float(x) for x in c.calibration],
            "ssids": "[" + ", ".join(c.used_ssids()) + "]",
        }

    # ------------------------------------------------------------------------ main loop
    async def _main_loop(self) -> None:
        while not self._reboot_requested:
            if self.faults.stall_s > 0:
                stall, self.faults.stall_s = self.faults.stall_s, 0.0
                await asyncio.sleep(stall)
            now = time.monotonic()
            if now - self._last_poll >= ACCEPT_POLL_S:
                self._last_poll = now
                self._poll_connections()
            await self.mqtt.update()
            await self._handle_input()
            if self._reboot_requested:
                break
            if self.session is not None:
                self._on_sampling(self.session)
            else:
                await self._on_idle()
            self._check_daily_restart()
            if self._reboot_requested:
                break
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel (stop()) that
            # arrives together with a wake-up, and the loop would run on forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()

    async def _handle_input(self) -> None:
        for ep in self.endpoints():
            line = ep.next_line()
            if line is None:
                continue
            if ep is self.serial:
                s = self.session
                if s is not None and not (isinstance(s.sink, EndpointSink) and s.sink.endpoint is ep):
                    continue  # §4.12: serial commands ignored while sampling to another sink
                self.log(LogLevel.ERROR, texts.MESSAGE_OVER_SERIAL)
            await handle_line(self, ep, parse_input_line(line), line)
            if self._reboot_requested:
                return

    async def _on_idle(self) -> None:
        now = time.monotonic()
        if self._raw_pending:
            ep = self._raw_pending.popleft()
            if ep.alive:
                self._start_raw_stream(ep)
                return
            ep.close()
        if self.pending_start is not None:
            await self._check_scheduled_start()
            if self.session is not None:
                return
        if now - self._last_lifeness > LIFENESS_S:
            self._last_lifeness = now
            self.log(LogLevel.INFO, "")
        if now - self._last_energy_store > ENERGY_STORE_S:
            self._last_energy_store = now
            self.store_energy()
        self.mqtt.on_idle()
        await self._check_stream_server()

    # ------------------------------------------------------------------ energy / daily
    def ade_energy(self, *, reset: bool) -> np.ndarray:
        """Energy the ADE accumulated since its last read (read-with-reset registers, §12 #11)."""
        now = self.clock.true_now()
        wh = np.asarray(self.grid.energy_wh(self._ade_energy_since, now, self.config.circuit))
        if reset:
            self._ade_energy_since = now
        return wh

    def store_energy(self) -> None:
        added = self.ade_energy(reset=True)
        self.stored.energy_wh = [float(a + b) for a, b in zip(self.stored.energy_wh, added, strict=True)]
        self.store.save()

    def _check_daily_restart(self) -> None:
        c = self.stored
        if c.reset_hour < 0 or not self.time_valid:
            return
        if time.monotonic() - self.boot_true < 60:
            return  # the same minute would match again right after the restart
        local = format_short_time(self.clock.now())[-8:-3]
        hm = (int(local[:2]), int(local[3:]))
        if hm == (c.reset_hour, c.reset_minute) and hm != self._last_daily_check_minute:
            self._last_daily_check_minute = hm
            self.store_energy()
            self.log(LogLevel.INFO, texts.DAILY_NOW)
            self.request_reboot()

    # ------------------------------------------------------------------- stream server
    def init_stream_server(self) -> None:
        if self.stored.stream_server != texts.UNSET:
            self.log(LogLevel.INFO, texts.STREAM_TRY.format(server=self.stored.stream_server))
            self._last_dial = float("-inf")

    async def _check_stream_server(self) -> None:
        """§7.2: every 30 s dial ``<streamServer>:54322`` and treat it as a command client."""
        server = self.stored.stream_server
        if server == texts.UNSET:
            return
        if self._dial_endpoint is not None and self._dial_endpoint.alive:
            return
        now = time.monotonic()
        if now - self._last_dial < self.config.stream_server_period_s:
            return
        self._last_dial = now
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(server, self.config.stream_server_port), DIAL_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            if not self._dial_failed_logged:
                self._dial_failed_logged = True
                self.log(LogLevel.WARNING, texts.STREAM_CANNOT.format(server=server))
            return
        self.log(LogLevel.INFO, texts.STREAM_CONNECTED.format(server=server))
        ep = TcpEndpoint(reader, writer)
        self._dial_endpoint = ep
        self.add_client(ep)

    # ------------------------------------------------------------------------ sampling
    def _new_engine(self) -> SamplingEngine:
        """One engine per boot: its last converted values survive sessions (RTC fillers, §4.10)."""
        return SamplingEngine(
            self.grid,
            self.clock,
            circuit=self.config.circuit,
            noise_seed=self.config.noise_seed * 1_000_003 + self.boot_count,
            rtc=self.config.rtc,
            keep_truth=self.config.keep_truth,
            name=self.name,
            ade_drift_ppm=self.config.ade_drift_ppm,
            rtc_drift_ppm=self.config.rtc_drift_ppm,
        )

    def start_session(
        self,
        settings: SampleSettings,
        sink: Sink,
        requester: Endpoint | None,
        *,
        at_true: float | None = None,
        raw_stream: bool = False,
        waveform_path: bool | None = None,
    ) -> Session:
        """Start acquisition now (or at ``at_true``); the caller replies afterwards (§4.4)."""
        from smartmeter_ophyd.protocol import chunk_size

        measures = settings.measures
        engine = self.engine
        waveform = (not measures.latched) if waveform_path is None else waveform_path
        if waveform and not measures.latched and not raw_stream:
            self.decimation_rate = settings.rate
        # §6.4 step 4: a scheduled latched start runs the waveform path with the previous
        # decimation; §7.1: the raw stream inherits the last decimation too.
        engine.start(
            measures,
            settings.rate,
            decimation_rate=self.decimation_rate if waveform else None,
            at_true=at_true,
            force_waveform=waveform and measures.latched,
        )
        self.ring.clear()
        chunk = chunk_size(settings.rate, measures.bytes_per_sample, _chunk_transport(settings, sink))
        session = Session(
            settings=settings,
            engine=engine,
            sink=sink,
            requester=requester,
            chunk=chunk,
            waveform=waveform,
            raw_stream=raw_stream,
            start_ts_text=self.timestamp(engine.start_meter_ts),
        )
        if settings.slot is not None:
            if isinstance(sink, EndpointSink) or requester is None:
                session.slot_sink = sink
            else:  # §5.3: slot writes go to the TCP/serial sink even for UDP/MQTT sessions
                session.slot_sink = EndpointSink(requester, Transport.TCP)
        if sink.local_ip:
            self.busy_ip = sink.local_ip
        self.session = session
        self.last_session = session
        self.last_engine = engine
        self.pending_start = None
        self.mqtt.sampling_changed(True)  # sampleCB (§8.2)
        return session

    def _start_raw_stream(self, ep: TcpEndpoint) -> None:
        """§7.1: an idle meter streams unprefixed 8 kHz VI to a port-54322 client at once."""
        settings = SampleSettings(prefix=False)
        self.sample_settings = settings  # standardConfig(): info.sampling_rate reads 8000
        self.start_session(settings, EndpointSink(ep, Transport.TCP), None, raw_stream=True)
        ep.discard_input = True
        ep.start_reading()  # only to notice the disconnect

    def countdown_true(self, delta_ms: int, armed_at_meter: float) -> float:
        """§6.4: the true instant a countdown of ``delta_ms`` ends, armed when the meter's
        clock read ``armed_at_meter``.

        The firmware arms ``countdown = millis() + delta`` and starts sampling at
        ``countdown - 1`` ms of the ESP's own oscillator, so a later NTP step of the
        software clock does not move the start.
        """
        armed = self.clock.true_time_of(armed_at_meter)
        return armed + (delta_ms / 1000 - SCHEDULE_EARLY_S) / self.clock.rate

    async def _check_scheduled_start(self) -> None:
        p = self.pending_start
        assert p is not None
        if p.due_true is None:
            at_true = self.clock.true_time_of(p.at_s - SCHEDULE_EARLY_S)
        else:
            at_true = p.due_true
        remaining = (at_true - self.clock.true_now()) * self.clock.rate  # on millis()
        if remaining > SCHEDULE_BUSY_WAIT_S:
            return
        # The firmware busy-waits the last 200 ms: this meter does nothing else meanwhile.
        await asyncio.sleep(max(0.0, at_true - self.clock.true_now()))
        self.log(LogLevel.DEBUG, texts.SCHEDULED_START_LOG.format(when=self.long_time(float(p.at_s))))
        self.start_session(p.settings, p.sink, p.requester, at_true=at_true, waveform_path=True)

    def _produce(self, s: Session) -> bool:
        """Move every due sample into the ring buffer; False after an overflow (→ reboot)."""
        values = s.engine.produce(self.clock.true_now())
        if len(values) == 0:
            return True
        data = np.ascontiguousarray(values, dtype="<f4").tobytes()
        if self.ring.write(data):
            return True
        lost = self.config.ring_buffer_bytes // s.bps
        self.log(LogLevel.ERROR, texts.OVERFLOW.format(samples=lost))
        self.request_reboot()
        return False

    def _on_sampling(self, s: Session) -> None:
        """onSampling (§4.7, §4.9, §5.3)."""
        if not s.sink.connected():
            self.log(LogLevel.ERROR, s.sink.lost_text)
            self.end_session()
            return
        if not self._produce(s):
            return
        settings = s.settings
        if settings.slot is not None and s.slot_sink is not None:
            slot, slots = settings.slot
            in_slot = slots != 0 and int(self.meter_unix()) % slots == slot
            if in_slot:
                s.slot_sent_bytes += self.write_chunks(s, s.slot_sink)
                s.slot_active = True
            elif s.slot_active:
                s.slot_active = False
                if s.slot_sent_bytes:
                    if self.ring.readable > s.chunk:
                        self.log(LogLevel.WARNING,
                                 texts.SLOT_NOT_FINISHED.format(n=self.ring.readable // s.bps))
                    else:
                        self.log(LogLevel.INFO, texts.SLOT_SENT.format(n=s.slot_sent_bytes // s.bps))
                s.slot_sent_bytes = 0
        if settings.rts:
            self.write_chunks(s, s.sink)
        self._check_seconds(s)
        self._log_rate(s)

    def _check_seconds(self, s: Session) -> None:
        """§4.7: once per loop pass after RTC seconds passed: ``MISSED <n> SAMPLES`` if the
        last one came up short (never for the session's first pass: ``firstSqwv``), and
        ``Loop <n>s behind`` if more than one passed since the previous pass."""
        engine = s.engine
        passed = engine.rtc_interrupts - s.seconds_seen
        if passed <= 0:
            return
        first = s.seconds_seen == 0
        s.seconds_seen = engine.rtc_interrupts
        rate = s.settings.rate
        if not first and engine.last_second_count != rate:
            self.log(LogLevel.ERROR, texts.MISSED.format(n=rate - engine.last_second_count))
        if passed > 1:
            self.log(LogLevel.WARNING, texts.LOOP_BEHIND.format(n=passed - 1))

    def _log_rate(self, s: Session) -> None:
        """§4.7: ``rate / (micros() between the last two rate marks)``, once per loop pass.

        The interval is timed by the ESP's oscillator (``drift_ppm``), never by true time,
        so the log reveals the sample clock only relative to the meter's own clock.
        """
        engine = s.engine
        if engine.rate_marks == s.rate_log_marks:
            return
        s.rate_log_marks = engine.rate_marks
        previous, last = engine.rate_mark
        elapsed = (last - previous) * self.clock.rate
        settings = s.settings
        if elapsed <= 0 or (settings.transport is Transport.SERIAL and settings.rate > 4000):
            return
        rate = float(np.float32(settings.rate) / np.float32(elapsed))
        self.log(LogLevel.INFO, texts.RATE_LOG.format(rate=rate, total=engine.samples_produced))

    def write_chunks(self, s: Session, sink: Sink, *, final: bool = False) -> int:
        """writeChunks: full chunks while MORE than one is buffered (§4.5), all at once (§4.7).

        ``final`` (stop, §4.8): every full chunk and then the short tail, ignoring back-pressure.
        Returns the payload bytes sent.
        """
        if isinstance(sink, MqttSink):  # writeDataMQTT: every whole sample, one message each
            return self.mqtt.publish_samples(s)
        chunk, readable = s.chunk, self.ring.readable
        serial = sink.serial_framing
        stride = chunk + (FRAME_HEADER_SIZE if s.settings.prefix else 0) + (len(CRLF) if serial else 0)
        if final:
            n_frames = readable // chunk
        else:
            n_frames = (readable - 1) // chunk if readable > chunk else 0
            n_frames = min(n_frames, sink.room() // stride)
        sent = 0
        if n_frames > 0:
            payload = self.ring.read(n_frames * chunk)
            samples = np.frombuffer(payload, dtype="<f4").reshape(-1, s.channels)
            frames = encode_frames(s.packet, samples, chunk // s.bps, prefix=s.settings.prefix,
                                   serial=serial)
            sent += self._emit(s, sink, frames, stride, chunk)
        if final and self.ring.readable:
            tail = self.ring.read_all()
            frame = encode_frame(s.packet, tail, prefix=s.settings.prefix, serial=serial)
            sent += self._emit(s, sink, frame, len(frame), len(tail))
        return sent

    def _emit(self, s: Session, sink: Sink, frames: bytes, stride: int, payload_len: int) -> int:
        n_frames = len(frames) // stride
        if self.faults.held_logs:
            # one line inside each of the next frames; the rest waits for later frames
            held = self.faults.held_logs[:n_frames]
            del self.faults.held_logs[:n_frames]
            out, last = [], 0
            for k, line in enumerate(held):
                cut = k * stride + stride // 2
                out += [frames[last:cut], line]
                last = cut
            frames = b"".join([*out, frames[last:]])
        if self.faults.garbage:
            garbage, self.faults.garbage = self.faults.garbage, b""
            frames = garbage + frames
        if self.faults.log_in_frame is not None:
            text, self.faults.log_in_frame = self.faults.log_in_frame, None
            line = encode_log_line(LogLevel.INFO, self.short_time(), text)
            mid = stride // 2
            frames = frames[:mid] + line + frames[mid:]
        accepted = sink.send(frames, stride)
        s.packet += n_frames
        if accepted >= len(frames):
            sent = n_frames * payload_len
        else:
            sent = (accepted // stride) * payload_len
        s.sent_payload_bytes += sent
        return sent

    def emit_single(self, s: Session, sink: Sink, payload: bytes) -> int:
        """One frame of arbitrary length (reqSamples, §5.2)."""
        frame = encode_frame(s.packet, payload, prefix=s.settings.prefix, serial=sink.serial_framing)
        return self._emit(s, sink, frame, len(frame), len(payload))

    def take_datagram_fault(self) -> DatagramFault | None:
        """Fault: what the network does to the next UDP datagram (None: delivered once)."""
        faults = self.faults
        if faults.drop_datagrams > 0:
            faults.drop_datagrams -= 1
            return "drop"
        if faults.duplicate_datagrams > 0:
            faults.duplicate_datagrams -= 1
            return "duplicate"
        if faults.reorder_datagrams > 0:
            faults.reorder_datagrams -= 1
            return "reorder"
        return None

    def random_ms(self, upper: int) -> int:
        return self._rng.randrange(upper)

    def stop_session(self) -> dict[str, Any]:
        """stopSampling + the stop reply (§4.8), keys in the firmware's order."""
        s = self.session
        assert s is not None
        self._produce(s)
        self.session = None
        s.engine.stop()
        self.mqtt.sampling_changed(False)  # sampleCB runs before the tail is flushed (§4.8)
        stop_true = self.clock.true_now()
        stop_meter = self.clock.meter_time(stop_true)
        if s.raw_stream and isinstance(s.sink, EndpointSink):
            s.sink.endpoint.close()  # closed BEFORE the flush: the raw client gets no tail
        self.write_chunks(s, s.sink, final=True)
        self.ring.clear()
        # millis() - startSamplingMillis: the ESP's oscillator, blind to NTP steps (§4.8).
        duration_ms = int((stop_true - s.engine.start_true) * self.clock.rate * 1000)
        samples = s.engine.samples_produced
        avg_rate = samples / (duration_ms / 1000) if duration_ms > 0 else float("inf")
        return {
            "msg": texts.STOP_MSG,
            "sample_duration": duration_ms,
            "samples": samples,
            "sent_samples": s.sent_payload_bytes // s.bps,
            "start_ts": s.start_ts_text,
            "stop_ts": self.timestamp(stop_meter),
            "ip": self.ip,
            "avg_rate": avg_rate,
            "cmd": "stop",
            "error": False,
        }

    def end_session(self) -> None:
        """Silent stop (§4.9): buffered data is discarded, no tail, no reply."""
        s = self.session
        self.session = None
        self.ring.clear()
        if s is not None:
            s.engine.stop()
            self.mqtt.sampling_changed(False)
        if s is not None and s.raw_stream and isinstance(s.sink, EndpointSink):
            s.sink.endpoint.close()

    # ------------------------------------------------------------------ replies / truth
    def send_reply(self, ep: Endpoint, reply: dict[str, Any]) -> None:
        """To the getter only; a copy goes to USB serial for non-serial requests (§2.8)."""
        data = encode_reply(reply)
        ep.write(data)
        if self.serial is not None and ep is not self.serial:
            self.serial.write(data)

    def send_plain(self, ep: Endpoint, text: str) -> None:
        ep.write(encode_plain_line(text))

    def session_truth(self) -> SessionTruth | None:
        """The sampling engine's full ground truth of the current (or last) session: true
        instant and kind of every delivered stream index, RTC interrupts, resets and refused
        samples, §6.5 duplicates, drops and records (see :class:`SessionTruth`); None if no
        session ran since start."""
        s = self.session or self.last_session
        return None if s is None else s.engine.truth()

    def truth(self) -> Truth | None:
        """Ground truth of the current (or last) session; None if none ran since start."""
        s = self.session or self.last_session
        if s is None:
            return None
        st: SessionTruth = s.engine.truth()
        return Truth(
            active=self.session is s,
            true_start=st.true_start,
            meter_start_ts=st.meter_start_ts,
            reported_start_ts=s.start_ts_text,
            clock_offset_s=st.clock_offset_s,
            drift_ppm=st.drift_ppm,
            rate=s.settings.rate,
            measures=s.settings.measures.reported,
            samples_produced=st.samples_produced,
            sent_samples=s.sent_payload_bytes // s.bps,
            packets=s.packet,
            values=st.values,
            ade_drift_ppm=st.ade_drift_ppm,
            rtc_drift_ppm=st.rtc_drift_ppm,
            n_fillers=st.filler_samples,
            n_duplicates=int(st.correction_duplicates.shape[0]),
            n_correction_drops=int(st.correction_drops.shape[0]),
            n_rtc_drops=int(st.rtc_drops.shape[0]),
            rtc_interrupts=int(st.rtc_edges.shape[0]),
        )

    def save_truth_values(self, path: str | Path) -> int:
        """Write the produced samples of the current/last session to a ``.npy``; returns n."""
        truth = self.truth()
        if truth is None:
            raise RuntimeError(f"smartmeter {self.name}: no sampling session has run yet")
        np.save(Path(path), truth.values)
        return int(truth.values.shape[0])

    # ------------------------------------------------------- test-only clock and network
    def clock_error_s(self) -> float:
        """Ground truth: the meter's clock minus true time now (s)."""
        return self.clock.offset_at(self.clock.true_now())

    def step_clock(self, delta_s: float) -> float:
        """Fault: the meter's clock jumps by ``delta_s`` now, as a wrong manual set would.

        The next NTP sync (§6.2) sets it right again; a running session keeps its sample
        lattice and only reacts through the §6.5 correction.  Returns :meth:`clock_error_s`.
        """
        delta = float(delta_s)
        if not -1e6 < delta < 1e6:
            raise ValueError(f"smartmeter {self.name}: clock step {delta_s!r} s is not plausible")
        clock = self.clock
        now = clock.true_now()
        synced = clock.synced
        clock.step_to(clock.meter_time(now) + delta, at_true=now)
        clock.synced = synced
        return self.clock_error_s()

    def set_network(
        self, delay_s: float | None = None, jitter_s: float | None = None
    ) -> tuple[float, float]:
        """Change the emulated one-way delay/jitter to the time server; returns both now."""
        delay = self.network.delay_s if delay_s is None else float(delay_s)
        jitter = self.network.jitter_s if jitter_s is None else float(jitter_s)
        if not (0.0 <= delay < 10.0 and 0.0 <= jitter < 10.0):
            raise ValueError(
                f"smartmeter {self.name}: network delay {delay_s!r} s and jitter {jitter_s!r} s "
                "must be >= 0 and < 10"
            )
        self.network.delay_s, self.network.jitter_s = delay, jitter
        return delay, jitter


def _chunk_transport(settings: SampleSettings, sink: Sink) -> Transport:
    if settings.transport in (Transport.UDP, Transport.SERIAL):
        return settings.transport
    return Transport.SERIAL if sink.serial_framing else Transport.TCP
