"""mDNS announcement of an emulated meter (protocol.md §9), with python-zeroconf.

What the firmware announces (``initMDNS``): host ``<name>.local`` and one service,
``_elec._tcp`` on port **54322** -- the raw-stream port, not the command port -- with **no
TXT records**.  The emulator announces the same on the meter's own address (``host``;
loopback in tests) with the meter's actual stream port, as soon as it has booted, and
again under the new name after an ``mdns`` command (the ESP32 responder is begun anew,
§3.2).  The announcement lives as long as the emulated meter; reboots keep it (the
firmware announces the same records again at boot).

Deviations: when the command port is not the firmware's 54321 (ephemeral ports in tests),
the service carries one TXT record ``cmd_port=<port>`` so that a discovered emulator can
be reached; a real meter never has it.  ArduinoOTA's ``_arduino._tcp`` (port 3232) is not
announced: the emulator has no OTA server behind it.  A name already taken on the link is
renamed by zeroconf (``<name>-2``), as the ESP-IDF responder also probes and renames.

Limits: announcing needs zeroconf (the ``discovery`` extra); probing takes about 1.5 s, in
the background, so a meter is discoverable shortly after :meth:`EmulatedMeter.start`
returns (:attr:`MdnsAnnouncer.announced` tells when).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._meter import EmulatedMeter

logger = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_elec._tcp.local."
FIRMWARE_COMMAND_PORT: Final = 54321
CMD_PORT_KEY: Final = "cmd_port"


class MdnsAnnouncer:
    """Announces one meter's ``_elec._tcp`` service; :meth:`announce` (re)registers it under
    the meter's current name, :meth:`close` withdraws it."""

    def __init__(self, meter: EmulatedMeter) -> None:
        try:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncZeroconf
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                f"smartmeter {meter.name}: mDNS needs python-zeroconf "
                "(pip install 'smartmeter-ophyd[discovery]')"
            ) from exc
        self.meter = meter
        host = meter.config.host
        interfaces: Any = [host] if host not in ("", "0.0.0.0") else None
        kwargs: dict[str, Any] = {"ip_version": IPVersion.V4Only}
        if interfaces is not None:
            kwargs["interfaces"] = interfaces
        self._zc = AsyncZeroconf(**kwargs)
        self._info: Any = None
        self._task: asyncio.Task[None] | None = None
        self.announced = asyncio.Event()
        """Set once the current name's registration (probing included) is done."""
        self.service_name: str | None = None
        """The registered instance name (``<name>._elec._tcp.local.``, possibly renamed)."""

    def properties(self) -> dict[str, str]:
        """TXT record: none, as the firmware, unless the command port is not 54321."""
        port = self.meter.command_port
        return {} if port == FIRMWARE_COMMAND_PORT else {CMD_PORT_KEY: str(port)}

    def announce(self) -> None:
        """Register (again) under the meter's current name, in the background."""
        previous = self._task
        self.announced.clear()
        self._task = asyncio.get_running_loop().create_task(
            self._register(previous), name=f"mdns {self.meter.name}"
        )

    async def _register(self, previous: asyncio.Task[None] | None) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        if previous is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await previous
        meter = self.meter
        if self._info is not None:
            await self._zc.async_unregister_service(self._info)
            self._info = None
        name = meter.name
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(meter.ip)],
            port=meter.stream_port,
            properties=self.properties(),
            server=f"{name}.local.",
        )
        try:
            await (await self._zc.async_register_service(info, allow_name_change=True))
        except Exception as exc:
            logger.warning("meter %s: mDNS announcement failed: %s", name, exc)
            return
        self._info = info
        self.service_name = info.name
        self.announced.set()
        logger.info("meter %s: announced %s on %s:%d", name, info.name, meter.ip, info.port)

    async def close(self) -> None:
        """Withdraw the service (goodbye packets) and close the responder."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
        self._info = None
        self.announced.clear()
