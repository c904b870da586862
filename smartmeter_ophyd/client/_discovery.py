"""Find meters on the local network by mDNS (protocol.md §9), with python-zeroconf.

The firmware announces host ``<name>.local`` and the service ``_elec._tcp`` on port 54322
(the raw-stream port, §7.1), without TXT records.  :func:`discover_async` browses that
service for ``timeout`` seconds, resolves every instance and returns one
:class:`DiscoveredMeter` each: name, address(es), the announced port and TXT properties,
and the port to send commands to -- 54321 on a real meter, or the ``cmd_port`` TXT record
that the emulator adds when it listens elsewhere (see ``smartmeter_ophyd.emulator``).

The author's own tools browse ``_arduino._tcp`` (ArduinoOTA) and guess by name; this
module relies on ``_elec._tcp``, which firmware 2.2 announces.  A renamed meter may keep
its old announcement until it reboots (§3.2).

Limits: mDNS is link-local multicast; meters behind a router are not found.  Browsing
answers only what arrives within ``timeout`` (the firmware does not re-announce
periodically, §9); a meter that does not answer the query in time is simply missing from
the list.  Needs the ``discovery`` extra (python-zeroconf).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

logger = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_elec._tcp.local."
"""The service firmware 2.2 announces (§9)."""
COMMAND_PORT: Final = 54321
"""The firmware's command port (§2); mDNS announces the stream port instead."""
CMD_PORT_KEY: Final = "cmd_port"
"""TXT key the emulator adds when its command port is not 54321."""
RESOLVE_TIMEOUT_MS: Final = 1500


@dataclass(frozen=True, slots=True)
class DiscoveredMeter:
    """One ``_elec._tcp`` announcement.

    ``name`` is the instance name (the meter's name, unless the responder had to rename a
    duplicate); ``host`` the announced host name (``<name>.local.``); ``port`` the announced
    port (the raw stream, 54322 on real meters); ``command_port`` where commands go.
    """

    name: str
    host: str
    addresses: tuple[str, ...]
    port: int
    command_port: int
    properties: dict[str, str] = field(default_factory=dict)
    service_name: str = ""

    @property
    def address(self) -> str:
        """The first announced IPv4 address (what a client connects to)."""
        return self.addresses[0]


def _import_zeroconf() -> Any:
    try:
        import zeroconf
        import zeroconf.asyncio
    except ImportError as exc:
        raise RuntimeError(
            "meter discovery needs python-zeroconf: pip install 'smartmeter-ophyd[discovery]'"
        ) from exc
    return zeroconf


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _meter_of(info: Any, service_name: str) -> DiscoveredMeter | None:
    addresses = tuple(info.parsed_addresses())
    if not addresses or info.port is None:
        logger.warning("mDNS: %s resolved without an address or port; skipped", service_name)
        return None
    properties = {_text(k): _text(v) for k, v in (info.properties or {}).items()}
    command_port = COMMAND_PORT
    if CMD_PORT_KEY in properties:
        try:
            command_port = int(properties[CMD_PORT_KEY])
        except ValueError:
            logger.warning(
                "mDNS: %s has a bad %s TXT record %r; using %d",
                service_name, CMD_PORT_KEY, properties[CMD_PORT_KEY], COMMAND_PORT,
            )
    instance = service_name[: -len(SERVICE_TYPE) - 1] if service_name.endswith(
        "." + SERVICE_TYPE) else service_name
    return DiscoveredMeter(
        name=instance,
        host=_text(info.server),
        addresses=addresses,
        port=int(info.port),
        command_port=command_port,
        properties=properties,
        service_name=service_name,
    )


async def discover_async(
    timeout: float = 3.0,
    *,
    interfaces: Sequence[str] | None = None,
    service_type: str = SERVICE_TYPE,
) -> list[DiscoveredMeter]:
    """Browse ``service_type`` for ``timeout`` seconds; the resolved meters, sorted by name.

    ``interfaces``: IPv4 addresses of the interfaces to use (default: all; the tests use
    ``["127.0.0.1"]``).
    """
    if not timeout > 0:
        raise ValueError(f"discovery timeout must be > 0 s, not {timeout!r}")
    zeroconf = _import_zeroconf()
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    kwargs: dict[str, Any] = {"ip_version": zeroconf.IPVersion.V4Only}
    if interfaces is not None:
        kwargs["interfaces"] = list(interfaces)
    azc = AsyncZeroconf(**kwargs)
    seen: dict[str, None] = {}

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is not zeroconf_state.Removed:
            seen.setdefault(name, None)

    zeroconf_state = zeroconf.ServiceStateChange
    browser = AsyncServiceBrowser(azc.zeroconf, [service_type], handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
        meters: list[DiscoveredMeter] = []
        for name in list(seen):
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(azc.zeroconf, RESOLVE_TIMEOUT_MS):
                logger.warning("mDNS: %s did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
                continue
            meter = _meter_of(info, name)
            if meter is not None:
                meters.append(meter)
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return sorted(meters, key=lambda m: (m.name, m.address, m.command_port))


def discover(
    timeout: float = 3.0,
    *,
    interfaces: Sequence[str] | None = None,
    service_type: str = SERVICE_TYPE,
) -> list[DiscoveredMeter]:
    """Blocking :func:`discover_async` (not from inside a running event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(
            discover_async(timeout, interfaces=interfaces, service_type=service_type)
        )
    raise RuntimeError("discover() blocks; inside an event loop await discover_async()")
