"""The main job: fly N emulated meters in one run into an embedded catalog and read it back.

``python -m smartmeter_ophyd.demo [--meters 2] [--seconds 5] [--rate 8000] [--directory var/demo]``

1. starts N firmware-faithful emulated meters in this process (own event-loop thread,
   ephemeral ports) plus a tiny local SNTP server so their clocks are set (§6.2) and
   ``startTs`` is a real time;
2. sets up the embedded Tiled catalog under ``<directory>/catalog`` registered as the Tiled
   profile ``smartmeter-demo`` (profiles in ``<directory>/profiles``);
3. runs :func:`fly_meters` with a RunEngine and a ``TiledWriter`` (``make_tiled_writer``): all
   meters in ONE run; meters sharing a rate share one stream (the RunEngine collects them to
   ``min(get_index())``), per-meter gap streams, and a final ``meter_summary`` stream;
4. reads the run back through ``databroker.from_profile`` and prints a short summary.

The reusable pieces are :class:`EmulatedMeters` (also used by the tests) and
:func:`fly_meters` (a plan usable with real meters).  Only :func:`main` prints.
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
from collections import defaultdict
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import bluesky.plan_stubs as bps
from bluesky.utils import Msg, short_uid

from .devices import FlyConfig, SmartMeter

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


# ---------------------------------------------------------------------------- the plan


def stream_groups(meters: Sequence[SmartMeter], stream: str) -> dict[str, list[SmartMeter]]:
    """Meters sharing a rate share ``stream``; otherwise each meter gets ``<stream>_<name>``."""
    by_rate: dict[int, list[SmartMeter]] = defaultdict(list)
    for meter in meters:
        by_rate[meter.fly_config.rate].append(meter)
    if len(by_rate) == 1:
        return {stream: list(meters)}
    return {f"{stream}_{m.name}": [m] for m in meters}


def fly_meters(
    meters: Sequence[SmartMeter],
    config: FlyConfig | dict[str, Any] | None = None,
    *,
    stream: str = "meter",
    flush_period: float = 0.5,
    md: dict[str, Any] | None = None,
) -> Generator[Msg, Any, str]:
    """One run: fly ``meters`` together and record samples, gaps and a final summary.

    Streams: ``stream`` (all meters of one rate; else one per meter), ``<meter>_gaps`` per
    meter, and ``meter_summary`` (one event: counts, reconciliation, HDF5 path; its descriptor
    holds each meter's configuration after the fly).
    """
    if config is not None:
        for meter in meters:
            yield from bps.prepare(meter, config, wait=True)
    groups = stream_groups(meters, stream)
    run_md = {"meters": {m.name: m.run_metadata() for m in meters}, "streams": sorted(groups)}
    run_md.update(md or {})
    uid: str = yield from bps.open_run(md=run_md)
    for name, members in groups.items():
        yield from bps.declare_stream(*members, name=name, collect=True)
    for meter in meters:
        yield from bps.declare_stream(meter.gap_stream, name=meter.gap_stream.name, collect=True)
    yield from bps.kickoff_all(*meters, wait=True)
    group = short_uid(label="complete")
    yield from bps.complete_all(*meters, group=group, wait=False)
    done = False
    while not done:
        done = yield from bps.wait(group=group, timeout=flush_period, error_on_timeout=False)
        for name, members in groups.items():
            yield from bps.collect(*members, name=name, return_payload=False)
    for meter in meters:
        yield from bps.collect(meter.gap_stream, name=meter.gap_stream.name, return_payload=False)
    yield from bps.trigger_and_read([m.run_summary for m in meters], name="meter_summary")
    yield from bps.close_run()
    return uid


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
                config = FlyConfig(rate=args.rate, duration_s=args.seconds)
                (uid,) = engine(fly_meters(meters, config, md={"purpose": "smartmeter-ophyd demo"}))
                summaries = {m.name: m.last_summary for m in meters}
        client = open_catalog(args.profile)
        try:
            run = client[uid]
            streams = run.start["streams"]
            lines.append(f"run {uid}  ({len(meters)} meters, {args.rate} Hz, {args.seconds:g} s; "
                         f"streams: {', '.join(streams)})")
            for meter in meters:
                stream = next(s for s in streams if s == "meter" or s.endswith(meter.name))
                node = run[stream]
                channel = f"{meter.name}_v_l1"
                n = node[channel].shape[0]
                first = [float(node[f"{meter.name}_{ch}"][0]) for ch in ("v_l1", "i_l1")]
                t_first = float(node[f"{meter.name}_time"][0])
                gaps = read_gaps(run, f"{meter.name}_gaps")
                summary = summaries[meter.name]
                assert summary is not None  # the fly succeeded, so it was reconciled
                lines.append(
                    f"  {meter.name}: {n} samples in the catalog ({summary.received_samples} "
                    f"received, meter sent {summary.device_sent_samples}), "
                    f"{summary.missing_declared} missing in {len(gaps['sample_index'])} gaps, "
                    f"start_ts {summary.start_ts:.3f} (first sample t={t_first:.3f}), "
                    f"first v_l1={first[0]:.2f} V i_l1={first[1]:.1f} mA, "
                    f"reconciled={summary.explained}"
                )
            if "meter" in streams and len(meters) > 1:
                lines.append("  (one shared stream is collected to the common min(get_index()); "
                             "samples past it are in each meter's HDF5 file, see meter_summary)")
        finally:
            close_client(client)
        lines.append("open it in IPython:")
        lines.append(f"  import os; os.environ['TILED_PROFILES'] = '{directory / 'profiles'}'")
        lines.append(f"  import databroker; run = databroker.from_profile('{args.profile}')['{uid}']")
        lines.append(f"  run['{streams[0]}'].read()   # xarray; run['meter_summary'].read() for counts")
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
