"""The main job: fly N emulated meters in one run into an embedded catalog and read it back.

``python -m smartmeter_ophyd.demo [--meters 2] [--seconds 5] [--rate 8000] [--directory var/demo]``

1. starts N firmware-faithful emulated meters in this process (own event-loop thread,
   ephemeral ports) plus a tiny local SNTP server so their clocks are set (§6.2) and
   ``startTs`` is a real time;
2. sets up the embedded Tiled catalog under ``<directory>/catalog`` registered as the Tiled
   profile ``smartmeter-demo`` (profiles in ``<directory>/profiles``);
3. runs :func:`plans.synchronized_fly` with a RunEngine and a ``TiledWriter``
   (``make_tiled_writer``): all meters in ONE run, gated on NTP and started on one
   scheduled instant (§6.4); one stream per meter with its gaps and timing streams, a
   ``synchronization`` and a ``meter_summary`` event;
4. reads the run back through ``databroker.from_profile`` and prints a short summary.

The reusable piece is :class:`EmulatedMeters` (also used by the tests); the plans live in
the top-level ``plans`` package.  Only :func:`main` prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from .devices import SmartMeter

logger = logging.getLogger(__name__)

DEMO_PROFILE: Final = "smartmeter-demo"
NTP_DELTA: Final = 2_208_988_800
"""Seconds from the NTP epoch (1900) to the unix epoch."""


# ---------------------------------------------------------------------- emulated meters


class _SntpServer(asyncio.DatagramProtocol):
    """Answers every 48-byte SNTP request with the host clock + ``offset_s`` (stratum 1)."""

    transport: asyncio.DatagramTransport | None = None

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 48 or self.transport is None:
            return
        now = time.time() + self.offset_s + NTP_DELTA
        secs = int(now)
        frac = int((now - secs) * 2**32)
        reply = bytearray(48)
        reply[0] = 0x24  # LI 0, version 4, mode 4 (server)
        reply[1] = 1
        reply[24:32] = data[40:48]  # originate = the client's transmit time
        struct.pack_into("!IIII", reply, 32, secs, frac, secs, frac)
        struct.pack_into("!II", reply, 40, secs, frac)
        self.transport.sendto(bytes(reply), addr)


class EmulatedMeters:
    """N emulated meters (and an SNTP server) on one private event-loop thread.

    Use as a context manager; ``meters[i].command_port`` is where a :class:`SmartMeter`
    connects.  ``call(fn)`` runs ``fn()`` on the loop thread (for ground truth and fault
    injection, which the emulator only allows from its own loop).

    ``ntp_offsets_s`` (one per meter) gives each meter its own SNTP server that is off by
    that many seconds: after its NTP sync (§6.2) the meter's clock is off by about as much,
    as for meters synced to different, imperfect time servers.  Default: one shared server
    on the host clock.  ``**config`` goes to every meter's ``EmulatorConfig``.
    """

    def __init__(
        self,
        count: int,
        *,
        name_prefix: str = "demo",
        ntp_offsets_s: Sequence[float] | None = None,
        **config: Any,
    ) -> None:
        if ntp_offsets_s is not None and len(ntp_offsets_s) != count:
            raise ValueError(
                f"ntp_offsets_s has {len(ntp_offsets_s)} entries for {count} emulated meters"
            )
        self.count = count
        self.name_prefix = name_prefix
        self.config = config
        self.ntp_offsets_s = tuple(ntp_offsets_s) if ntp_offsets_s is not None else None
        self.meters: list[Any] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulated meters",
                                        daemon=True)
        self._ntp: list[asyncio.DatagramTransport] = []

    def __enter__(self) -> EmulatedMeters:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    async def _sntp_server(self, offset_s: float) -> int:
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _SntpServer(offset_s), local_addr=("127.0.0.1", 0)
        )
        self._ntp.append(transport)
        return int(transport.get_extra_info("sockname")[1])

    async def _start(self) -> None:
        from .emulator import EmulatedMeter, EmulatorConfig

        if self.ntp_offsets_s is None:
            shared = await self._sntp_server(0.0)
            ntp_ports = [shared] * self.count
        else:
            ntp_ports = [await self._sntp_server(offset) for offset in self.ntp_offsets_s]
        for i in range(self.count):
            settings: dict[str, Any] = {
                "name": f"{self.name_prefix}{i + 1}",
                "time_server": "127.0.0.1",
                "ntp_port": ntp_ports[i],
                "boot_delay_s": 0.05,
                "serial": False,
                "stream_server_port": 9,
                "grid_seed": 0,
                "circuit": i,
                "noise_seed": i,
            }
            settings.update(self.config)
            meter = EmulatedMeter(EmulatorConfig(**settings))
            await meter.start()
            self.meters.append(meter)

    def call(self, fn: Any, timeout: float = 30.0) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def truth(self, index: int) -> Any:
        """The emulator's ground truth of meter ``index``'s last session."""
        return self.call(self.meters[index].truth)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            for meter in self.meters:
                with contextlib.suppress(Exception):
                    await meter.stop()
            for transport in self._ntp:
                transport.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()


# ------------------------------------------------------------------------------ the CLI


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m smartmeter_ophyd.demo", description=__doc__.split("\n")[0])
    p.add_argument("--meters", type=int, default=2, help="number of emulated meters (default 2)")
    p.add_argument("--seconds", type=float, default=5.0, help="fly duration (default 5)")
    p.add_argument("--rate", type=int, default=8000, help="sampling rate in Hz (default 8000)")
    p.add_argument("--directory", type=Path, default=Path("var/demo"),
                   help="catalog, HDF5 and profile directory (default var/demo)")
    p.add_argument("--profile", default=DEMO_PROFILE, help=f"Tiled profile name (default {DEMO_PROFILE})")
    p.add_argument("-v", "--verbose", action="store_true", help="log this package at INFO")
    return p.parse_args(argv)


@contextlib.contextmanager
def _connected(meters: Sequence[SmartMeter]) -> Iterator[None]:
    try:
        for meter in meters:
            meter.connect()
        yield
    finally:
        for meter in meters:
            meter.destroy()


def run_demo(args: argparse.Namespace) -> list[str]:
    """Do the job; return the lines of the human summary."""
    from bluesky import RunEngine

    from plans import synchronized_fly

    from .storage import (
        close_client,
        make_tiled_writer,
        open_catalog,
        read_gaps,
        setup_embedded_catalog,
    )

    t0 = time.monotonic()
    directory = args.directory.resolve()
    catalog = setup_embedded_catalog(
        directory / "catalog", profile=args.profile, profiles_dir=directory / "profiles"
    )
    lines: list[str] = []
    try:
        with EmulatedMeters(args.meters) as emulated:
            meters = [
                SmartMeter("127.0.0.1", m.command_port, name=m.name,
                           data_directory=catalog.data_directory, timeout=3.0)
                for m in emulated.meters
            ]
            with _connected(meters):
                engine = RunEngine({})
                engine.subscribe(make_tiled_writer(catalog.client))
                plan = synchronized_fly(meters, args.seconds, rate=args.rate,
                                        md={"purpose": "smartmeter-ophyd demo"})
                (uid,) = engine(plan)
                summaries = {m.name: m.last_summary for m in meters}
        client = open_catalog(args.profile)
        try:
            run = client[uid]
            sync = run["synchronization"].read()
            start_time = float(sync[f"{meters[0].name}_scheduled_start"].values[0])
            lines.append(f"run {uid}  ({len(meters)} meters, {args.rate} Hz, {args.seconds:g} s; "
                         f"common start T={start_time:.0f}; one stream per meter)")
            for meter in meters:
                node = run[meter.name]
                channel = f"{meter.name}_v_l1"
                n = node[channel].shape[0]
                first = [float(node[f"{meter.name}_{ch}"][0]) for ch in ("v_l1", "i_l1")]
                t_first = float(node[f"{meter.name}_time"][0])
                gaps = read_gaps(run, f"{meter.name}_gaps")
                summary = summaries[meter.name]
                assert summary is not None  # the fly succeeded, so it was reconciled
                gate = run.start["synchronization"]["gate"][meter.name]["confidences_ms"][-1]
                lines.append(
                    f"  {meter.name}: {n} samples in the catalog ({summary.received_samples} "
                    f"received, meter sent {summary.device_sent_samples}), "
                    f"{summary.missing_declared} missing in {len(gaps['sample_index'])} gaps, "
                    f"NTP gate {gate:g} ms, start_ts {summary.start_ts:.3f} "
                    f"(first sample t={t_first:.3f}), "
                    f"first v_l1={first[0]:.2f} V i_l1={first[1]:.1f} mA, "
                    f"reconciled={summary.explained}"
                )
        finally:
            close_client(client)
        lines.append("open it in IPython:")
        lines.append(f"  import os; os.environ['TILED_PROFILES'] = '{directory / 'profiles'}'")
        lines.append(f"  import databroker; run = databroker.from_profile('{args.profile}')['{uid}']")
        lines.append(f"  run['{meters[0].name}'].read()   # xarray; "
                     "run['meter_summary'].read() for counts")
        lines.append(f"done in {time.monotonic() - t0:.1f} s")
    finally:
        catalog.close()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("smartmeter_ophyd").setLevel(logging.INFO)
    if args.meters < 1:
        print("--meters must be at least 1", file=sys.stderr)
        return 2
    try:
        lines = run_demo(args)
    except Exception as exc:
        logger.debug("demo failed", exc_info=True)
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
