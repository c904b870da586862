"""Discovery over mDNS on loopback (protocol.md §9): emulated meters announce ``_elec._tcp``
with python-zeroconf and :func:`discover_async` finds, resolves and reaches them.

Other test runs on this host may announce meters too: every check looks for this test's own
meters by their (unique) names.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from smartmeter_ophyd.client import AsyncMeterClient, DiscoveredMeter, discover, discover_async
from smartmeter_ophyd.emulator import EmulatedMeter, EmulatorConfig

LOOPBACK = ["127.0.0.1"]
BROWSE_S = 1.5
"""Longer than a second: a meter that has just announced may not multicast its records again
for a second (RFC 6762 §6), and the browser's first (QU) query is answered by unicast to port
5353, which the kernel may hand to another socket bound there on the same host (the emulator's
own, avahi's).  The browser's second query, about a second in, is answered by multicast."""


def unique(tag: str) -> str:
    return f"d{os.getpid() % 100000}{tag}"  # <= 19 characters (§3.2)


@pytest.fixture
async def announced(mdns_exclusive: None) -> AsyncIterator[Callable[..., Awaitable[EmulatedMeter]]]:
    meters: list[EmulatedMeter] = []

    async def start(name: str, **overrides: Any) -> EmulatedMeter:
        config = EmulatorConfig(name=name, mdns=True, serial=False, boot_delay_s=0.05,
                                time_server="127.0.0.1", ntp_port=9, **overrides)
        meter = EmulatedMeter(config)
        await meter.start()
        meters.append(meter)
        assert meter.mdns is not None
        await asyncio.wait_for(meter.mdns.announced.wait(), 5)
        return meter

    yield start
    for meter in meters:
        await meter.stop()


def ours(found: list[DiscoveredMeter], *names: str) -> dict[str, DiscoveredMeter]:
    return {m.name: m for m in found if m.name in names}


async def test_discovers_emulated_meters_on_loopback(announced) -> None:  # type: ignore[no-untyped-def]
    """§9: each meter announces _elec._tcp on its stream port (not the command port), host
    <name>.local; the emulator-only cmd_port TXT record leads to a working command port."""
    a, b = await asyncio.gather(announced(unique("a")), announced(unique("b")))
    found = ours(await discover_async(BROWSE_S, interfaces=LOOPBACK), a.name, b.name)
    assert set(found) == {a.name, b.name}
    for meter in (a, b):
        entry = found[meter.name]
        assert entry.host == f"{meter.name}.local."
        assert entry.addresses == ("127.0.0.1",) and entry.address == "127.0.0.1"
        assert entry.port == meter.stream_port != meter.command_port
        assert entry.properties == {"cmd_port": str(meter.command_port)}
        assert entry.command_port == meter.command_port
        assert entry.service_name == f"{meter.name}._elec._tcp.local."
        async with AsyncMeterClient(entry.address, entry.command_port) as client:
            assert client.info is not None and client.info.name == meter.name


async def test_rename_and_stop_change_what_is_found(announced) -> None:  # type: ignore[no-untyped-def]
    """§3.2: after 'mdns' the meter is announced under its new name; a stopped meter says
    goodbye and is no longer found."""
    old, new = unique("old"), unique("new")
    meter = await announced(old)
    async with AsyncMeterClient("127.0.0.1", meter.command_port) as client:
        await client.set_name(new)
    assert meter.mdns is not None
    await asyncio.wait_for(meter.mdns.announced.wait(), 5)
    found = ours(await discover_async(BROWSE_S, interfaces=LOOPBACK), old, new)
    assert set(found) == {new}
    assert found[new].command_port == meter.command_port
    await meter.stop()
    assert ours(await discover_async(BROWSE_S, interfaces=LOOPBACK), old, new) == {}


def test_blocking_discover_and_bad_timeout(mdns_exclusive: None) -> None:
    """The blocking form runs its own loop; a zero timeout is refused before browsing."""
    assert isinstance(discover(0.2, interfaces=LOOPBACK), list)
    with pytest.raises(ValueError, match="timeout"):
        discover(0, interfaces=LOOPBACK)
