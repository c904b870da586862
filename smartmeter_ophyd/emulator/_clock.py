"""A meter's clock, the network between meter and time server, and a real SNTP client.

Intent
------
Every emulated meter has a clock that is wrong in a known way: a constant offset at a
reference instant plus a linear drift in ppm.  The "true" time is the host's clock
(``time.time`` by default); everything the meter reports (``startTs``, log times, sampling
instants) is the meter clock.  Because the error is known exactly, the emulator can hand
tests the ground truth (``offset_at``).

The SNTP client speaks the real protocol over UDP the way the firmware does (§6.2): one
48-byte request whose first byte is 0xE3, at most 200 ms wait, the clock set to the
server's transmit time plus half the round trip, confidence = half the round trip in ms,
results outside 2018..2100 rejected.  An emulated network delay (``NetworkModel``) is
added to both legs with ``asyncio.sleep`` so tests can create symmetric or asymmetric
paths; with forth/back delays ``d1``/``d2`` the clock ends up ``(d1 - d2) / 2`` ahead of
true time, exactly the error real SNTP makes.

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
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "NTP_UNIX_EPOCH_DELTA",
    "SNTP_REQUEST",
    "MeterClock",
    "NetworkModel",
    "SntpResult",
    "sntp_sync",
]

logger = logging.getLogger(__name__)

NTP_UNIX_EPOCH_DELTA = 2_208_988_800
"""Seconds from 1900-01-01 (NTP era 0) to 1970-01-01."""

_YEAR_2018_UNIX = 1_514_764_800
_YEAR_2101_UNIX = 4_133_980_800
"""§6.2: results outside 2018..2100 are rejected."""

SNTP_REQUEST = bytes(
    [0xE3, 0x00, 0x06, 0xEC, 0, 0, 0, 0, 0, 0, 0, 0, 0x31, 0x4E, 0x31, 0x34] + [0] * 32
)
"""The firmware's 48-byte request (LI=3, VN=4, mode 3 client; poll 6, precision -20,
reference id "1N14"; all timestamps zero, as in the Arduino NTP example it derives from)."""


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
    """Outcome of one successful SNTP exchange."""

    confidence_ms: int
    """Half the round trip in ms, as logged by ``NTP synced with conf: <ms>`` (§6.2)."""
    rtt_s: float
    """Round trip measured on the meter clock, including the emulated network delays."""
    error_s: float
    """Ground truth: meter clock minus true time right after the sync."""
    server_time: float
    """The server's transmit timestamp (unix seconds)."""


class _SntpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


def _ntp_to_unix(packet: bytes) -> float:
    seconds, fraction = struct.unpack_from("!II", packet, 40)
    return float(seconds - NTP_UNIX_EPOCH_DELTA + fraction / 2**32)


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
        transport.sendto(SNTP_REQUEST)
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

    if len(reply) < 48:
        logger.info("SNTP reply from %s:%d too short (%d bytes)", server, port, len(reply))
        return None
    server_time = _ntp_to_unix(reply)
    if not _YEAR_2018_UNIX <= server_time < _YEAR_2101_UNIX:
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
    )
