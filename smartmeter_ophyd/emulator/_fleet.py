"""A fleet of emulated meters and their SNTP time server on one private event-loop thread.

Intent
------
``EmulatorFleet`` is what tests, demos and benchmarks start instead of real meters: N
:class:`EmulatedMeter` on ephemeral ports of one host, all sampling ONE grid model (shared
``grid_seed``; each meter its own circuit and noise), plus :class:`SntpResponder`, a small
SNTP server every meter uses as its time server unless told otherwise.  The responder serves
the host clock plus ``time_offset_s`` (settable while running), so a host-side SNTP client
can be tested against a known offset.

Every meter takes its own settings: ``EmulatorConfig`` fields (``drift_ppm`` of the ESP's
software clock, ``ade_drift_ppm`` of the sample clock, ``rtc_drift_ppm`` of the RTC,
``network_delay_s``/``network_jitter_s`` to the time server, ``rtc``, ...) and two fleet-only
keys:

* ``clock_offset_s``: the meter's clock error right after :meth:`EmulatorFleet.start`.  The
  boot NTP (§6.2) would erase an initial offset, so the fleet steps the clock after boot.
  The next NTP sync (or a reboot) sets the clock right again.
* ``time_server_offset_s``: the meter gets its own SNTP responder that is off by this much;
  every NTP sync then leaves the meter about that far off (meters synced to different,
  imperfect servers).

The emulator's state belongs to the loop thread: every method here runs there through
:meth:`EmulatorFleet.call` and returns when it is done.

Limits
------
* All meters share one host and one loop thread; at high rates the meters share its CPU.
* ``clock_offset_s`` is applied once, after the first boot; reboots do not re-apply it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from smartmeter_ophyd.protocol import RemoteProtocolError, server_reply

from . import _control
from ._clock import SntpResult
from ._control import Corrections, SampleTimes
from ._meter import EmulatedMeter, EmulatorConfig, Truth
from ._sampling import SessionTruth

__all__ = ["EmulatorFleet", "SntpResponder"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

FLEET_KEYS = frozenset({"clock_offset_s", "time_server_offset_s"})
_CONFIG_KEYS = frozenset(f.name for f in fields(EmulatorConfig))


class SntpResponder(asyncio.DatagramProtocol):
    """Answers every SNTP request with the host clock + ``offset_s`` (stratum 1).

    ``clock`` is the "true" time source (the same one the meters' clocks use).  Malformed
    requests are ignored (logged at DEBUG), as a time server would.
    """

    def __init__(self, offset_s: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self.offset_s = float(offset_s)
        self.requests = 0
        self._clock = clock
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is None:
            return
        now = self._clock() + self.offset_s
        try:
            reply = server_reply(data, now, now)
        except RemoteProtocolError as exc:
            logger.debug("SNTP responder ignores a request from %s: %s", addr, exc)
            return
        self.requests += 1
        self.transport.sendto(reply, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


class EmulatorFleet:
    """N emulated meters and their SNTP responder on one private event-loop thread.

    ``meters`` is a count or one settings mapping per meter (``EmulatorConfig`` field names,
    plus ``clock_offset_s`` after boot and ``time_server_offset_s``, see the module
    docstring).  ``**common`` applies to every meter before its own settings.  Defaults:
    names ``<name_prefix>1..N``, ``boot_delay_s`` 0.05, no serial pty, stream-server dial-out
    to the discard port 9, one grid (``grid_seed`` 0) with meter ``i`` on circuit ``i`` and
    noise seed ``i``, a control channel on an ephemeral port, and the fleet's responder as
    time server.

    ``i`` in the methods is a meter's index or name.  Use as a context manager or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        meters: int | Sequence[Mapping[str, Any]] = 1,
        *,
        name_prefix: str = "meter",
        host: str = "127.0.0.1",
        time_offset_s: float = 0.0,
        control: bool = True,
        start_timeout_s: float = 30.0,
        **common: Any,
    ) -> None:
        per_meter: list[Mapping[str, Any]] = (
            [{} for _ in range(meters)] if isinstance(meters, int) else list(meters)
        )
        if not per_meter:
            raise ValueError("an EmulatorFleet needs at least one meter")
        self.host = host
        self.start_timeout_s = start_timeout_s
        self._settings = [
            self._settings_of(i, name_prefix, control, common, own)
            for i, own in enumerate(per_meter)
        ]
        self._time_offset_s = float(time_offset_s)
        self._meters: list[EmulatedMeter] = []
        self._responder: SntpResponder | None = None
        self._own_responders: dict[int, SntpResponder] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _settings_of(
        self,
        i: int,
        prefix: str,
        control: bool,
        common: Mapping[str, Any],
        own: Mapping[str, Any],
    ) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "name": f"{prefix}{i + 1}",
            "host": self.host,
            "boot_delay_s": 0.05,
            "serial": False,
            "stream_server_port": 9,
            "grid_seed": 0,
            "circuit": i,
            "noise_seed": i,
            "seed": i,
            "control_port": 0 if control else None,
        }
        settings.update(common)
        settings.update(own)
        unknown = set(settings) - _CONFIG_KEYS - FLEET_KEYS
        if unknown:
            raise ValueError(
                f"emulated meter {i} ({settings['name']}): unknown settings {sorted(unknown)}; "
                f"known: {sorted(_CONFIG_KEYS | FLEET_KEYS)}"
            )
        return settings

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> EmulatorFleet:
        """Start the loop thread, the responder(s) and every meter (booted, NTP done)."""
        if self._thread is not None:
            raise RuntimeError("this EmulatorFleet was already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="EmulatorFleet", daemon=True
        )
        self._thread.start()
        try:
            self._submit(self._start(), self.start_timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    async def _serve_sntp(self, offset_s: float) -> SntpResponder:
        loop = asyncio.get_running_loop()
        _, responder = await loop.create_datagram_endpoint(
            lambda: SntpResponder(offset_s), local_addr=(self.host, 0)
        )
        return responder

    async def _start(self) -> None:
        self._responder = await self._serve_sntp(self._time_offset_s)
        configs: list[EmulatorConfig] = []
        for i, settings in enumerate(self._settings):
            config = {k: v for k, v in settings.items() if k not in FLEET_KEYS}
            if "time_server_offset_s" in settings:
                own = await self._serve_sntp(float(settings["time_server_offset_s"]))
                self._own_responders[i] = own
                config.setdefault("time_server", self.host)
                config["ntp_port"] = own.port
            elif "time_server" not in config:
                config["time_server"] = self.host
                config["ntp_port"] = self._responder.port
            if "clock_offset_s" in settings:
                config["clock_offset_s"] = float(settings["clock_offset_s"])
            configs.append(EmulatorConfig(**config))
        self._meters = [EmulatedMeter(c) for c in configs]
        results = await asyncio.gather(*(m.start() for m in self._meters), return_exceptions=True)
        for meter, result in zip(self._meters, results, strict=True):
            if isinstance(result, BaseException):
                raise RuntimeError(f"smartmeter {meter.name} failed to start: {result}") from result
        for meter, settings in zip(self._meters, self._settings, strict=True):
            if "clock_offset_s" in settings:
                meter.step_clock(float(settings["clock_offset_s"]) - meter.clock_error_s())

    def close(self) -> None:
        """Stop every meter and responder, the loop and its thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def stop() -> None:
            for meter in self._meters:
                try:
                    await meter.stop()
                except Exception:
                    logger.exception("smartmeter %s did not stop cleanly", meter.name)
            for responder in [self._responder, *self._own_responders.values()]:
                if responder is not None and responder.transport is not None:
                    responder.transport.close()
            await loop.shutdown_default_executor()

        if thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
            except Exception:
                logger.exception("EmulatorFleet did not stop cleanly")
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        if not loop.is_running():
            loop.close()
        self._loop = None
        self._responder = None
        self._own_responders.clear()

    def __enter__(self) -> EmulatorFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------- properties
    @property
    def meters(self) -> list[EmulatedMeter]:
        """The meters (their state belongs to the loop thread: read it through :meth:`call`)."""
        return list(self._meters)

    @property
    def names(self) -> list[str]:
        return [str(s["name"]) for s in self._settings]

    @property
    def ports(self) -> list[int]:
        """Command port per meter (fixed for the fleet's lifetime, reboots included)."""
        return [m.command_port for m in self._meters]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, command_port)`` per meter."""
        return [(self.host, m.command_port) for m in self._meters]

    @property
    def control_addresses(self) -> list[tuple[str, int] | None]:
        """``(host, control_port)`` per meter; None where the control channel is off."""
        return [
            (self.host, m.control_port) if m.control_port is not None else None
            for m in self._meters
        ]

    @property
    def sntp_address(self) -> tuple[str, int]:
        """``(host, port)`` of the shared SNTP responder."""
        if self._responder is None:
            raise RuntimeError("the EmulatorFleet is not running")
        return self.host, self._responder.port

    @property
    def time_offset_s(self) -> float:
        """Offset of the shared responder's time from the host clock (s)."""
        return self._time_offset_s

    @time_offset_s.setter
    def time_offset_s(self, offset_s: float) -> None:
        offset = float(offset_s)
        self._time_offset_s = offset
        if self._responder is not None:
            responder = self._responder
            self.call(lambda: setattr(responder, "offset_s", offset))

    # ------------------------------------------------------------------ loop access
    def _submit(self, coro: Any, timeout: float) -> Any:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the EmulatorFleet is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn()`` on the loop thread (awaiting it if it returns an awaitable)."""

        async def run() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            return result

        return self._submit(run(), timeout)  # type: ignore[no-any-return]

    def meter(self, i: int | str) -> EmulatedMeter:
        """Meter by index or name."""
        if isinstance(i, str):
            for meter, name in zip(self._meters, self.names, strict=False):
                if name == i:
                    return meter
            raise KeyError(f"no emulated meter named {i!r}; meters: {self.names}")
        if not 0 <= i < len(self._meters):
            raise IndexError(f"no emulated meter {i}: the fleet runs {len(self._meters)}")
        return self._meters[i]

    # ------------------------------------------------------------ ground truth, control
    def truth(self, i: int | str) -> Truth:
        """Ground truth of meter ``i``'s current or last session."""
        meter = self.meter(i)
        truth = self.call(meter.truth)
        if truth is None:
            raise LookupError(f"smartmeter {meter.name}: no sampling session has run yet")
        return truth

    def session_truth(self, i: int | str) -> SessionTruth:
        """The sampling engine's full ground truth of meter ``i``'s current or last session."""
        meter = self.meter(i)
        return self.call(lambda: _control.session_truth(meter))

    def ntp_history(self, i: int | str) -> list[SntpResult]:
        """Every successful SNTP sync of meter ``i`` (true instant, true error after it,
        confidence, round trip), oldest first."""
        meter = self.meter(i)
        return self.call(lambda: list(meter.ntp_history))

    def clock_error_s(self, i: int | str) -> float:
        """Meter ``i``'s clock minus true time now (s)."""
        return self.call(self.meter(i).clock_error_s)

    def step_clock(self, i: int | str, delta_s: float) -> float:
        """Meter ``i``'s clock jumps by ``delta_s``; returns its clock error afterwards."""
        meter = self.meter(i)
        return self.call(lambda: meter.step_clock(delta_s))

    def set_network(
        self, i: int | str, delay_s: float | None = None, jitter_s: float | None = None
    ) -> tuple[float, float]:
        """Change meter ``i``'s one-way delay/jitter to its time server; returns both."""
        meter = self.meter(i)
        return self.call(lambda: meter.set_network(delay_s, jitter_s))

    def sample_times(self, i: int | str, start: int = 0, stop: int | None = None) -> SampleTimes:
        """True instants (and kinds) of meter ``i``'s delivered rows ``[start, stop)``."""
        meter = self.meter(i)
        return self.call(lambda: _control.sample_times(meter, start, stop))

    def corrections(self, i: int | str) -> Corrections:
        """Duplicates, fillers and drops in meter ``i``'s current or last session."""
        meter = self.meter(i)
        return self.call(lambda: _control.corrections(meter))

    def inject(self, i: int | str, fault: str, **args: Any) -> None:
        """A fault from the control channel's table: ``stall`` (``seconds``), ``garbage``
        (``hex``), ``log_in_frame`` (``text``), ``drop_udp``, ``duplicate_udp``, ``reorder_udp``
        (each ``count``), ``drop_connections``, ``reboot``."""
        meter = self.meter(i)
        op = _control.FAULTS.get(fault)
        if op is None:
            raise ValueError(
                f"smartmeter {meter.name}: unknown fault {fault!r}; faults: {sorted(_control.FAULTS)}"
            )
        self.call(lambda: op(meter, {"op": fault, **args}))
