"""A scripted fake peer and verbatim firmware bytes for the client tests (§2.5, Appendix B)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from smartmeter_ophyd.emulator import EmulatedMeter, EmulatorConfig

MeterStarter = Callable[..., Awaitable[EmulatedMeter]]
"""What the ``start_meter`` fixture gives: ``await start(tag, broker=..., **settings)``."""


def unique(tag: str) -> str:
    """A meter name no other test process uses on the shared broker."""
    return f"m{os.getpid() % 100000}{tag}"

INFO_LINE = (
    b'Info:{"cmd":"info","type":"smartmeter","version":"2.2","compiled":"Nov  3 2021 18:09:15",'
    b'"sys_time":"03/02/2021 10:37:07.662","name":"fake","ip":"192.168.0.138","mqtt_server":"-",'
    b'"stream_server":"-","time_server":"time.google.com","sampling_rate":8000,'
    b'"buffer_size":3670016,"psram":true,"rtc":true,"state":"idle",'
    b'"energy":"[0.0000, 0.0000, 0.0000]","dailyReset":"None","calibration":[1,1,1,1,1,1],'
    b'"ssids":"[]"}\r\n'
)
"""protocol.md Appendix B, verbatim (name changed)."""


Script = Callable[[bytes], list[bytes]]
"""Maps one received command line (without ``\\n``) to the byte chunks to send back."""


class FakePeer:
    """A scripted TCP peer: sends ``greeting`` on connect, then answers lines via ``script``."""

    def __init__(self, greeting: bytes, script: Script | None = None, *, close_at_once=False):
        self.greeting = greeting
        self.script = script or (lambda line: [])
        self.close_at_once = close_at_once
        self.received: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> FakePeer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.close_at_once:
            writer.close()
            return
        writer.write(self.greeting)
        try:
            while line := await reader.readline():
                self.received.append(line.rstrip(b"\n"))
                for chunk in self.script(line.rstrip(b"\n")):
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def push(self, data: bytes) -> None:
        for writer in self.writers:
            writer.write(data)

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def cmd_of(line: bytes) -> str:
    return str(json.loads(line)["cmd"])




def emulator_config(**overrides: Any) -> EmulatorConfig:
    settings: dict[str, Any] = {"name": "emu", "boot_delay_s": 0.2, "serial": False}
    settings.update(overrides)
    return EmulatorConfig(**settings)


NTP_UNIX_EPOCH_DELTA = 2_208_988_800


class SntpResponder(asyncio.DatagramProtocol):
    """Answers every 48-byte SNTP request with the host's clock (transmit timestamp, RFC 4330)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        import struct
        import time

        now = time.time() + NTP_UNIX_EPOCH_DELTA
        seconds = int(now)
        fraction = int((now - seconds) * 2**32)
        reply = bytearray(48)
        reply[0] = 0x24  # LI 0, version 4, mode 4 (server)
        reply[1] = 1
        struct.pack_into("!II", reply, 32, seconds, fraction)
        struct.pack_into("!II", reply, 40, seconds, fraction)
        self.transport.sendto(bytes(reply), addr)  # type: ignore[attr-defined]


async def start_sntp() -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(SntpResponder, local_addr=("127.0.0.1", 0))
    return transport, int(transport.get_extra_info("sockname")[1])  # type: ignore[return-value]
