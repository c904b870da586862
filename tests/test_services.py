"""The services of scripts/services.sh answer like the real thing (real sockets, 127.0.0.1)."""

from __future__ import annotations

import socket
import struct
import time

import pytest

NTP_UNIX_EPOCH_OFFSET_S = 2_208_988_800  # 1900-01-01 -> 1970-01-01


def test_ntp_server_answers_sntp_with_a_sane_time(ntp_server: tuple[str, int]) -> None:
    # LI=3, version 4, mode 3 (client): the request the firmware sends (§6.2)
    request = b"\xe3" + bytes(47)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.sendto(request, ntp_server)
        reply, sender = sock.recvfrom(512)
    assert sender == ntp_server
    assert len(reply) == 48
    assert reply[0] & 0x07 == 4, "mode must be 4 (server)"
    assert 1 <= reply[1] <= 15, f"stratum {reply[1]} is not a synchronised server"
    seconds, fraction = struct.unpack("!II", reply[40:48])
    transmit_unix = seconds - NTP_UNIX_EPOCH_OFFSET_S + fraction / 2**32
    assert transmit_unix == pytest.approx(time.time(), abs=5.0)


def test_mqtt_broker_accepts_an_mqtt_connect(mqtt_broker: tuple[str, int]) -> None:
    # MQTT 3.1.1 CONNECT, clean session, client id "t"; the broker must answer CONNACK rc=0.
    variable_header = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = b"\x00\x01t"
    body = variable_header + payload
    with socket.create_connection(mqtt_broker, timeout=2.0) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        connack = sock.recv(4)
    assert connack == b"\x20\x02\x00\x00"
