"""SNTP packets (RFC 4330) as the meter, the host and the emulator's time server use them.

Sans-I/O: these functions build and parse 48-byte packets and do the four-timestamp
arithmetic; the caller owns the socket and the clock.  Three users share them:

* the emulated meter sends the firmware's own request (:data:`FIRMWARE_SNTP_REQUEST`, §6.2)
  and takes the server's transmit time plus half the round trip;
* :class:`~smartmeter_ophyd.devices.HostClock` sends :func:`client_request` with its transmit
  time and computes offset and delay with :func:`offset_and_delay`;
* the emulator's time server answers with :func:`server_reply`.

Limits: NTP era 0 only (1900..2036), which covers the firmware's accepted 2018..2100 range
until 2036; no authentication, no kiss-o'-death handling beyond reporting stratum 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ._errors import RemoteProtocolError

NTP_UNIX_EPOCH_DELTA: Final = 2_208_988_800
"""Seconds from 1900-01-01 (NTP era 0) to 1970-01-01."""

SNTP_PACKET_SIZE: Final = 48
SNTP_PORT: Final = 123

FIRMWARE_SNTP_REQUEST: Final = bytes(
    [0xE3, 0x00, 0x06, 0xEC, 0, 0, 0, 0, 0, 0, 0, 0, 0x31, 0x4E, 0x31, 0x34] + [0] * 32
)
"""The firmware's 48-byte request (§6.2): LI=3, VN=4, mode 3 (client), poll 6, precision -20,
reference id "1N14", every timestamp zero (as in the Arduino NTP example it derives from)."""

FIRMWARE_YEARS_UNIX: Final = (1_514_764_800, 4_133_980_800)
"""§6.2: the firmware rejects a server time outside [2018-01-01, 2101-01-01)."""

_MODE_CLIENT: Final = 3
_MODE_SERVER: Final = 4


def to_ntp_timestamp(unix_s: float) -> tuple[int, int]:
    """Unix seconds as NTP (seconds, 2**-32 fraction) of era 0."""
    ntp = unix_s + NTP_UNIX_EPOCH_DELTA
    seconds = int(ntp)
    fraction = min(int((ntp - seconds) * 2**32), 2**32 - 1)
    return seconds & 0xFFFFFFFF, fraction


def from_ntp_timestamp(seconds: int, fraction: int) -> float:
    """An NTP era-0 (seconds, fraction) pair as unix seconds (0 stays 0.0: "not set")."""
    if seconds == 0 and fraction == 0:
        return 0.0
    return seconds - NTP_UNIX_EPOCH_DELTA + fraction / 2**32


@dataclass(frozen=True, slots=True)
class SntpPacket:
    """The fields of an SNTP packet that clients and servers use (times as unix seconds)."""

    leap: int
    version: int
    mode: int
    stratum: int
    originate: float
    """The client's transmit time echoed by the server (0.0 when unset)."""
    receive: float
    """When the server received the request (server clock)."""
    transmit: float
    """When the server sent the reply (server clock); what the firmware sets its clock to."""


def client_request(transmit_unix_s: float) -> bytes:
    """A version-4 client request carrying ``transmit_unix_s`` so the reply can be matched."""
    packet = bytearray(SNTP_PACKET_SIZE)
    packet[0] = (0 << 6) | (4 << 3) | _MODE_CLIENT
    struct.pack_into("!II", packet, 40, *to_ntp_timestamp(transmit_unix_s))
    return bytes(packet)


def server_reply(
    request: bytes, receive_unix_s: float, transmit_unix_s: float, *, stratum: int = 1
) -> bytes:
    """A server's answer to ``request``: its transmit time becomes the reply's originate."""
    if len(request) < SNTP_PACKET_SIZE:
        raise RemoteProtocolError(
            f"SNTP request of {len(request)} bytes; expected {SNTP_PACKET_SIZE}"
        )
    version = (request[0] >> 3) & 0x7 or 4
    packet = bytearray(SNTP_PACKET_SIZE)
    packet[0] = (0 << 6) | (version << 3) | _MODE_SERVER
    packet[1] = stratum
    packet[2] = request[2]
    packet[3] = 0xEC  # precision 2**-20 s
    packet[12:16] = b"LOCL"
    struct.pack_into("!II", packet, 16, *to_ntp_timestamp(receive_unix_s))  # reference
    packet[24:32] = request[40:48]  # originate = the client's transmit
    struct.pack_into("!II", packet, 32, *to_ntp_timestamp(receive_unix_s))
    struct.pack_into("!II", packet, 40, *to_ntp_timestamp(transmit_unix_s))
    return bytes(packet)


def parse_packet(data: bytes) -> SntpPacket:
    """Parse a 48-byte (or longer, with extensions) SNTP packet."""
    if len(data) < SNTP_PACKET_SIZE:
        raise RemoteProtocolError(
            f"SNTP packet of {len(data)} bytes; expected at least {SNTP_PACKET_SIZE}"
        )
    first = data[0]
    originate = from_ntp_timestamp(*struct.unpack_from("!II", data, 24))
    receive = from_ntp_timestamp(*struct.unpack_from("!II", data, 32))
    transmit = from_ntp_timestamp(*struct.unpack_from("!II", data, 40))
    return SntpPacket(
        leap=first >> 6,
        version=(first >> 3) & 0x7,
        mode=first & 0x7,
        stratum=data[1],
        originate=originate,
        receive=receive,
        transmit=transmit,
    )


def parse_server_reply(data: bytes, sent_unix_s: float | None = None) -> SntpPacket:
    """Parse a server's reply and check it is usable.

    Raises :class:`RemoteProtocolError` naming the problem: not a server reply, stratum 0
    (kiss-o'-death or unsynchronised), no transmit time, or (with ``sent_unix_s``) an
    originate that does not echo the request this client sent.
    """
    packet = parse_packet(data)
    if packet.mode != _MODE_SERVER:
        raise RemoteProtocolError(f"SNTP reply has mode {packet.mode}, not 4 (server)")
    if packet.stratum == 0 or packet.leap == 3:
        raise RemoteProtocolError(
            f"SNTP server is unsynchronised (stratum {packet.stratum}, leap {packet.leap})"
        )
    if packet.transmit == 0.0:
        raise RemoteProtocolError("SNTP reply carries no transmit time")
    if sent_unix_s is not None:
        expected = from_ntp_timestamp(*to_ntp_timestamp(sent_unix_s))
        if abs(packet.originate - expected) > 1e-6:
            raise RemoteProtocolError(
                "SNTP reply does not answer this request (its originate time "
                f"{packet.originate:.6f} is not our transmit time {expected:.6f})"
            )
    return packet


def offset_and_delay(
    sent: float, server_received: float, server_sent: float, received: float
) -> tuple[float, float]:
    """RFC 4330's clock offset (server minus client) and round-trip delay, in seconds.

    ``sent``/``received`` are on the client's clock, the other two on the server's.
    """
    offset = ((server_received - sent) + (server_sent - received)) / 2.0
    delay = (received - sent) - (server_sent - server_received)
    return offset, delay


def firmware_time_is_plausible(unix_s: float) -> bool:
    """§6.2: whether the firmware would accept a server time (2018..2100)."""
    low, high = FIRMWARE_YEARS_UNIX
    return low <= unix_s < high
