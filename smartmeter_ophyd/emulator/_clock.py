"""A meter's NTP-set software clock, the network to the time server, and a real SNTP client.

Intent
------
Every emulated meter has a software clock that is wrong in a known way: a constant offset at
a reference instant plus a linear drift in ppm (the ESP32's crystal, which also drives
``millis()``/``micros()`` and the latched-mode hardware timer).  The "true" time is the host's
clock (``time.time`` by default).  Everything the meter reports as a time (``startTs``,
``start_ts``/``stop_ts``, log times, the §6.5 ``From``/``To`` stamps) is read from this clock.
Because the error is known exactly, the emulator can hand tests the ground truth
(``offset_at``).  The meter's two other oscillators, the ADE9000 sample clock and the DS3231
RTC, are modelled by the sampling engine (``_sampling``), each with its own drift.

The SNTP client speaks the real protocol over UDP the way the firmware does (§6.2), with the
packet helpers shared with the rest of the package (``protocol._sntp``): one 48-byte request
whose first byte is 0xE3, at most 200 ms wait, the clock set to the server's transmit time plus
half the round trip, confidence = half the round trip in ms, results outside 2018..2100
rejected.  An emulated network delay (``NetworkModel``) is added to both legs with
``asyncio.sleep`` so tests can create symmetric or asymmetric paths; with forth/back delays
``d1``/``d2`` the clock ends up ``(d1 - d2) / 2`` ahead of true time, exactly the error real
SNTP makes.

Limits
------
* The clock is a straight line between syncs (no temperature effects, no slewing).
* Before the first successful sync ``synced`` is False; the clock still runs (the server
  decides to print ``0.000`` timestamps then, §6.1, §12 #33).
* The meter's sub-millisecond resolution is kept (the firmware keeps ms); this makes
  SNTP results up to 1 ms more exact than a real meter's.
* Deliberate deviation: the firmware sends from local UDP port 2390; several emulated
  meters share one host, so the request goes out from an ephemeral port instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..protocol import (
    FIRMWARE_SNTP_REQUEST,
    RemoteProtocolError,
    firmware_time_is_plausible,
    parse_packet,
)

__all__ = [
    "MeterClock",
    "NetworkModel",
    "SntpResult",
    "split_ms",
    "sntp_sync",
]

logger = logging.getLogger(__name__)


def split_ms(unix_s: float) -> tuple[int, int]:
    """``(seconds, milliseconds)`` of a meter time, rounded to the millisecond with carry.

    Rounds like the emulator's timestamps (``format_timestamp``); a fraction of .9995 or more
    carries into the next second instead of reading ``ms == 1000`` (or 0 of the same second).
    """
    seconds, ms = divmod(int(round(unix_s * 1000)), 1000)
    return seconds, ms


class MeterClock:
    """Meter time as a linear function of true time: ``offset`` at a reference, ``drift_ppm``.

    ``meter_time(t) = anchor_meter + (t - anchor_true) * (1 + drift_ppm * 1e-6)``.  The
    anchor is (true time at construction, that + ``offset_s``) until ``step_to`` moves it.
    """

    def __init__(
        self,
        offset_s: float = 0.0,
        drift_ppm: float = 0.0,
        *,
        true_time: Callable[[], float] = time.time,
        anchor_true: float | None = None,
    ) -> None:
        """``anchor_true`` (additive to the agreed interface) pins the reference instant so
        tests and replays are deterministic; by default it is ``true_time()`` now."""
        if not -1e5 < drift_ppm < 1e5:
            raise ValueError(f"drift_ppm {drift_ppm} is not a plausible crystal error")
        self._true_time = true_time
        self.drift_ppm = float(drift_ppm)
        self._anchor_true = float(true_time() if anchor_true is None else anchor_true)
        self._anchor_meter = self._anchor_true + float(offset_s)
        self.synced = False
        """False until the first successful NTP sync (§6.1: timestamps read 0.000)."""

    @property
    def rate(self) -> float:
        """Meter seconds per true second."""
        return 1.0 + self.drift_ppm * 1e-6

    @property
    def anchor(self) -> tuple[float, float]:
        """(true time, meter time) of the current reference point."""
        return self._anchor_true, self._anchor_meter

    def true_now(self) -> float:
        return self._true_time()

    def meter_time(self, t_true: float) -> float:
        return self._anchor_meter + (t_true - self._anchor_true) * self.rate

    def true_time_of(self, t_meter: float) -> float:
        return self._anchor_true + (t_meter - self._anchor_meter) / self.rate

    def now(self) -> float:
        return self.meter_time(self.true_now())

    def offset_at(self, t_true: float) -> float:
        """The true timing error at ``t_true``: meter clock minus true time (s)."""
        return (self._anchor_meter - self._anchor_true) + (t_true - self._anchor_true) * (
            self.rate - 1.0
        )

    def step_to(self, t_meter_at_true: float, at_true: float) -> None:
        """Set the clock (NTP): it reads ``t_meter_at_true`` at true time ``at_true``."""
        self._anchor_true = float(at_true)
        self._anchor_meter = float(t_meter_at_true)
        self.synced = True

    def __repr__(self) -> str:
        return (
            f"MeterClock(offset_now={self.offset_at(self.true_now()):+.6f}s, "
            f"drift_ppm={self.drift_ppm:+.3f}, synced={self.synced})"
        )


@dataclass
class NetworkModel:
    """One-way delays of the emulated path meter <-> time server.

    Each call of ``one_way`` draws ``delay_s + jitter_s * N(0, 1)`` clipped at 0 from a
    private ``random.Random(seed)``, so a sequence of draws is reproducible.
    """

    delay_s: float = 0.0005
    jitter_s: float = 0.0
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError(
                f"network delay and jitter must be >= 0, not {self.delay_s}/{self.jitter_s}"
            )
        self._rng = random.Random(self.seed)

    def one_way(self) -> float:
        if self.jitter_s == 0.0:
            return self.delay_s
        return max(0.0, self.delay_s + self.jitter_s * self._rng.gauss(0.0, 1.0))


@dataclass(frozen=True)
class SntpResult:
    """Outcome of one successful SNTP exchange, with its ground truth."""

    confidence_ms: int
    """Half the round trip in ms, as logged by ``NTP synced with conf: <ms>`` (§6.2)."""
    rtt_s: float
    """Round trip measured on the meter clock, including the emulated network delays."""
    error_s: float
    """Ground truth: meter clock minus true time right after the sync."""
    server_time: float
    """The server's transmit timestamp (unix seconds)."""
    true_time: float
    """Ground truth: the true instant at which the clock was set (reply received)."""


class _SntpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def sntp_sync(
    clock: MeterClock,
    server: str,
    port: int = 123,
    network: NetworkModel | None = None,
    timeout_s: float = 0.2,
) -> SntpResult | None:
    """One firmware-style SNTP exchange; on success step ``clock`` and return the result.

    Returns None (and logs why at INFO) on timeout (§6.2: 200 ms including the emulated
    delays), resolution/socket failure, a malformed reply or a time outside 2018..2100.
    """
    loop = asyncio.get_running_loop()
    forth = network.one_way() if network is not None else 0.0
    back = network.one_way() if network is not None else 0.0
    try:
        # Ephemeral local port, not the firmware's 2390: several meters share this host.
        transport, protocol = await asyncio.wait_for(
            loop.create_datagram_endpoint(_SntpProtocol, remote_addr=(server, port)),
            timeout=max(timeout_s, 1.0),
        )
    except (OSError, TimeoutError) as exc:
        logger.info("SNTP to %s:%d failed: cannot open UDP endpoint: %s", server, port, exc)
        return None
    try:
        meter_sent = clock.now()
        deadline = loop.time() + timeout_s
        await asyncio.sleep(forth)
        transport.sendto(FIRMWARE_SNTP_REQUEST)
        try:
            reply = await asyncio.wait_for(
                asyncio.shield(protocol.reply), timeout=max(0.0, deadline - back - loop.time())
            )
        except TimeoutError:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            logger.info("SNTP to %s:%d timed out after %.0f ms", server, port, timeout_s * 1e3)
            return None
        except OSError as exc:
            logger.info("SNTP to %s:%d failed: %s", server, port, exc)
            return None
        await asyncio.sleep(back)
        true_received = clock.true_now()
        meter_received = clock.meter_time(true_received)
    finally:
        transport.close()

    try:
        # The firmware reads only the transmit timestamp (bytes 40..47), whatever the mode.
        server_time = parse_packet(reply).transmit
    except RemoteProtocolError as exc:
        logger.info("SNTP reply from %s:%d unusable: %s", server, port, exc)
        return None
    if not firmware_time_is_plausible(server_time):
        logger.info("SNTP reply from %s:%d rejected: time %.3f outside 2018..2100",
                    server, port, server_time)
        return None
    rtt = meter_received - meter_sent
    clock.step_to(server_time + rtt / 2.0, at_true=true_received)
    return SntpResult(
        confidence_ms=int(rtt * 1000 / 2),
        rtt_s=rtt,
        error_s=clock.offset_at(true_received),
        server_time=server_time,
        true_time=true_received,
    )
