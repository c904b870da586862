"""``HostClock``: the host's clock error against a time server, as a triggerable ophyd device.

Intent: a scheduled start (§6.4) is a unix second chosen by the host and judged by every
meter on its NTP clock, so plans must know how far the host's clock is off before they pick
one.  ``trigger()`` sends ``queries`` SNTP requests (RFC 4330, one after the other, each
waiting at most ``timeout``) and keeps the answer with the smallest round trip, whose offset
is the least distorted by path asymmetry and scheduling delays::

    clock = HostClock("127.0.0.1", 123)
    yield from bps.trigger_and_read([clock])   # host_clock_offset_s, host_clock_delay_s

* ``offset_s`` (hinted): server time minus host time, seconds.
* ``delay_s``: the round trip of the kept query, seconds (the offset's error is at most
  half of it).
* ``server`` (config): ``host:port`` queried.

The packets and arithmetic are :mod:`smartmeter_ophyd.protocol`'s sans-I/O SNTP helpers, shared
with the emulator; this module owns only a small stdlib UDP client.  The queries run on one
short-lived thread per trigger (the wait is bounded by ``queries * timeout``), so the
RunEngine's loop is never blocked.  A reply that answers an earlier, timed-out request (its
originate time is not ours) is skipped, not taken.

Failures (the status fails with :class:`HostClockError`, naming the server): the name does not
resolve, the server is unreachable (ICMP port unreachable), no reply within ``timeout`` to any
query, or only nonsense replies (not a server reply, unsynchronised, no transmit time, a
negative round trip).  Some queries failing while another succeeds is logged, not raised.

Limits: host time is ``time.time()`` read just before sending and just after receiving, so a
thread switch there adds to the measured delay; the smallest-delay choice filters that out.
No kiss-o'-death handling, no authentication, one server per device.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus

from ..protocol import (
    SNTP_PORT,
    RemoteProtocolError,
    client_request,
    offset_and_delay,
    parse_server_reply,
)

logger = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 1024
"""Larger than any SNTP reply (48 bytes plus optional extension fields)."""


class HostClockError(Exception):
    """The host clock could not be measured; the message names the server and the problem."""

    def __init__(self, server: str, problem: str) -> None:
        super().__init__(f"time server {server}: {problem}")
        self.server = server
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ClockMeasurement:
    """One SNTP exchange: server minus host (``offset_s``) and its round trip (``delay_s``)."""

    offset_s: float
    delay_s: float
    stratum: int


class _ReadOnly(Signal):
    def __init__(self, *args: Any, units: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._units = units

    def put(self, value: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{self.name} is measured by trigger() and cannot be written")

    def _update(self, value: Any, timestamp: float) -> None:
        super().put(value, timestamp=timestamp)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc: dict[str, dict[str, Any]] = super().describe()
        if self._units:
            desc[self.name]["units"] = self._units
        if isinstance(self.get(), float):
            desc[self.name].update({"dtype": "number", "shape": [], "dtype_numpy": "<f8"})
        return desc


class HostClock(Device):
    """The host's clock against the SNTP server ``server:port`` (see the module docstring)."""

    offset_s = Cpt(_ReadOnly, value=math.nan, units="s", kind=Kind.hinted)
    delay_s = Cpt(_ReadOnly, value=math.nan, units="s", kind=Kind.normal)
    server = Cpt(_ReadOnly, value="", kind=Kind.config)

    def __init__(
        self,
        server: str,
        port: int = SNTP_PORT,
        *,
        name: str = "host_clock",
        timeout: float = 1.0,
        queries: int = 4,
        **kwargs: Any,
    ) -> None:
        if not server:
            raise ValueError("HostClock needs a time server address")
        if not 0 < int(port) < 65536:
            raise ValueError(f"HostClock: port {port!r} is not a UDP port")
        if not timeout > 0:
            raise ValueError(f"HostClock: timeout must be > 0 s, not {timeout!r}")
        if int(queries) < 1:
            raise ValueError(f"HostClock: queries must be >= 1, not {queries!r}")
        super().__init__("", name=name, **kwargs)
        self.host = server
        self.port = int(port)
        self.timeout = float(timeout)
        self.queries = int(queries)
        self.last_measurement: ClockMeasurement | None = None
        """The kept exchange of the last successful trigger."""
        self.server._update(self.address, time.time())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def trigger(self) -> DeviceStatus:
        """Measure; the status fails with :class:`HostClockError` naming the server."""
        status = DeviceStatus(self)

        def run() -> None:
            try:
                best = self.measure()
            except Exception as exc:
                now = time.time()
                self.offset_s._update(math.nan, now)
                self.delay_s._update(math.nan, now)
                status.set_exception(exc)
            else:
                now = time.time()
                self.last_measurement = best
                self.offset_s._update(best.offset_s, now)
                self.delay_s._update(best.delay_s, now)
                status.set_finished()

        threading.Thread(target=run, name=f"{self.name} sntp", daemon=True).start()
        return status

    def measure(self) -> ClockMeasurement:
        """Blocking: run the queries now and return the one with the smallest delay."""
        family, address = self._resolve()
        results: list[ClockMeasurement] = []
        problems: list[str] = []
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            # Connected: an ICMP "port unreachable" surfaces as ConnectionRefusedError.
            sock.connect(address)
            for _ in range(self.queries):
                try:
                    results.append(self._query(sock))
                except HostClockError as exc:
                    problems.append(exc.problem)
        if not results:
            raise HostClockError(self.address, _summary(problems, self.queries))
        if problems:
            logger.info("%s: %d of %d SNTP queries failed: %s", self.address,
                        len(problems), self.queries, "; ".join(problems))
        return min(results, key=lambda m: m.delay_s)

    def _resolve(self) -> tuple[int, Any]:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise HostClockError(self.address, f"cannot resolve the name: {exc}") from exc
        family, _, _, _, address = infos[0]
        return family, address

    def _query(self, sock: socket.socket) -> ClockMeasurement:
        sent = time.time()
        deadline = time.monotonic() + self.timeout
        try:
            sock.send(client_request(sent))
        except OSError as exc:
            raise HostClockError(self.address, f"unreachable: {exc}") from exc
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostClockError(self.address, f"no reply within {self.timeout} s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                raise HostClockError(self.address, f"no reply within {self.timeout} s") from None
            except ConnectionRefusedError as exc:
                raise HostClockError(
                    self.address, "unreachable: nothing listens there (ICMP port unreachable)"
                ) from exc
            except OSError as exc:
                raise HostClockError(self.address, f"unreachable: {exc}") from exc
            received = time.time()
            try:
                packet = parse_server_reply(data, sent)
            except RemoteProtocolError as exc:
                if _answers_another_request(data, sent):
                    continue  # a late reply to an earlier query: keep waiting for ours
                raise HostClockError(self.address, f"nonsense reply: {exc}") from exc
            offset, delay = offset_and_delay(sent, packet.receive, packet.transmit, received)
            if delay < 0:
                raise HostClockError(
                    self.address,
                    f"nonsense reply: negative round trip {delay * 1e3:.3f} ms "
                    "(the server's receive and transmit times contradict our clock)",
                )
            return ClockMeasurement(offset, delay, packet.stratum)


def _answers_another_request(data: bytes, sent: float) -> bool:
    """A well-formed server reply whose originate is not our transmit time."""
    try:
        packet = parse_server_reply(data)
    except RemoteProtocolError:
        return False
    return abs(packet.originate - sent) > 1e-6


def _summary(problems: list[str], queries: int) -> str:
    distinct = list(dict.fromkeys(problems))
    if len(distinct) == 1:
        return f"{distinct[0]} ({queries} of {queries} queries)"
    return f"all {queries} queries failed: " + "; ".join(distinct)
