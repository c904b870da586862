"""Where a sampling session's frames go: TCP, UDP, Serial, the raw stream port, MQTT (§4, §7).

A sink takes encoded frames (``stride`` bytes each) and reports how many bytes were
accepted, which is what the stop reply's ``sent_samples`` counts (§4.8).  ``room()`` is the
back-pressure the firmware gets from a blocking send: the session only moves data out of
its ring buffer into a sink with room, so an unread client ends in a ring-buffer overflow
(§4.10) rather than in unbounded queues.

``SINK_FACTORIES`` maps each :class:`Transport` to how it is built.  :class:`MqttSink` is the
meter's MQTT client (:mod:`._mqtt`): its samples are published one JSON message each
(§4.14), not framed, and the session lives as long as the broker connection (§4.9).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from smartmeter_ophyd.protocol import Transport

from . import _texts as texts
from ._endpoints import Endpoint, TcpEndpoint

if TYPE_CHECKING:
    from ._mqtt import MeterMqtt

HIGH_WATER_BYTES: Final = 65_536
"""Unsent bytes a sink may hold before the session stops feeding it (emulates a blocking send)."""

DatagramFault = Literal["drop", "duplicate", "reorder"]
"""What the network does to one UDP datagram (test-only fault injection, not firmware)."""

HELD_DATAGRAM_MAX_S: Final = 0.2
"""A datagram held back for reordering goes out after this long if no other follows it (the
session's last one): far above the gap between datagrams even on a loaded host, below the
quiet time a client waits for stragglers after the stop reply."""


class Sink:
    """Base of all sampling sinks."""

    transport: Transport = Transport.TCP
    serial_framing = False
    lost_text = texts.TCP_LOST

    def connected(self) -> bool:
        raise NotImplementedError

    def room(self) -> int:
        """Bytes the sink takes now without blocking."""
        raise NotImplementedError

    def send(self, frames: bytes, stride: int) -> int:
        """Write whole frames; return accepted bytes."""
        raise NotImplementedError

    @property
    def local_ip(self) -> str | None:
        """Device address seen by the sink (the busy reply quotes it, §2.8); None for Serial."""
        return None


class EndpointSink(Sink):
    """TCP command connection, raw stream socket or the serial port."""

    def __init__(self, endpoint: Endpoint, transport: Transport) -> None:
        self.endpoint = endpoint
        self.transport = transport
        self.serial_framing = endpoint.kind == "serial"

    def connected(self) -> bool:
        return self.endpoint.alive

    def room(self) -> int:
        if self.serial_framing:  # the UART drains at 2 Mbaud whether or not a host reads
            return HIGH_WATER_BYTES
        return max(0, HIGH_WATER_BYTES - self.endpoint.backlog())

    def send(self, frames: bytes, stride: int) -> int:
        return self.endpoint.write(frames)

    @property
    def local_ip(self) -> str | None:
        return self.endpoint.local_ip if isinstance(self.endpoint, TcpEndpoint) else None


class UdpSink(Sink):
    """One frame per datagram to the requester's IP and ``payload.port`` (§4.13).

    The session lives as long as the TCP connection that issued the command (§4.9).
    ``datagram_fault`` is the network between device and host (test-only): a datagram may be
    lost, arrive twice, or arrive after the one that follows it.  Every such datagram left
    the device, so it counts as accepted (``sent_samples``, §4.8) exactly once.
    """

    transport = Transport.UDP
    lost_text = texts.UDP_LOST

    def __init__(
        self,
        datagrams: asyncio.DatagramTransport,
        address: tuple[str, int],
        requester: Endpoint,
        datagram_fault: Callable[[], DatagramFault | None],
    ) -> None:
        self.datagrams = datagrams
        self.address = address
        self.requester = requester
        self._fault = datagram_fault
        self._held: bytes | None = None

    def connected(self) -> bool:
        return self.requester.alive

    def room(self) -> int:
        # Selector datagram transports queue when the kernel refuses; typeshed lacks the method.
        queued = getattr(self.datagrams, "get_write_buffer_size", lambda: 0)()
        return max(0, HIGH_WATER_BYTES - int(queued))

    def send(self, frames: bytes, stride: int) -> int:
        for offset in range(0, len(frames), stride):
            frame = frames[offset : offset + stride]
            if self._held is not None:  # the datagram that overtakes the held one
                self.datagrams.sendto(frame, self.address)
                self._release_held()
                continue
            fault = self._fault()
            if fault == "drop":
                continue
            if fault == "reorder":
                self._held = frame
                self._release_later(frame)
                continue
            self.datagrams.sendto(frame, self.address)
            if fault == "duplicate":
                self.datagrams.sendto(frame, self.address)
        return len(frames)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.datagrams.is_closing():
            self.datagrams.sendto(held, self.address)

    def _release_later(self, frame: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the meter's loop: nothing can overtake it
            self._release_held()
            return

        def release_if_still_held() -> None:
            if self._held is frame:
                self._release_held()

        loop.call_later(HELD_DATAGRAM_MAX_S, release_if_still_held)

    @property
    def local_ip(self) -> str | None:
        return getattr(self.requester, "local_ip", None) or None


class MqttSink(Sink):
    """MQTT sampling (§4.14): the meter publishes each sample itself
    (:meth:`~._mqtt.MeterMqtt.publish_samples`); frames are never sent here."""

    transport = Transport.MQTT
    lost_text = texts.MQTT_LOST

    def __init__(self, mqtt: MeterMqtt | None) -> None:
        self.mqtt = mqtt

    def connected(self) -> bool:
        return self.mqtt is not None and self.mqtt.connected()

    def room(self) -> int:
        return HIGH_WATER_BYTES  # QoS 0 publishes do not wait for the broker

    def send(self, frames: bytes, stride: int) -> int:
        raise RuntimeError("MQTT sessions publish samples, not frames (§4.14)")


@dataclass(frozen=True)
class SinkRequest:
    """What a sink factory gets: the requesting endpoint and the validated payload bits."""

    requester: Endpoint
    serial: Endpoint | None
    udp_port: int
    datagrams: asyncio.DatagramTransport | None
    datagram_fault: Callable[[], DatagramFault | None]
    mqtt: MeterMqtt | None = None


def _tcp(req: SinkRequest) -> Sink:
    return EndpointSink(req.requester, Transport.TCP)


def _serial(req: SinkRequest) -> Sink:
    if req.serial is None:
        raise RuntimeError("this meter has no serial port")
    return EndpointSink(req.serial, Transport.SERIAL)


def _udp(req: SinkRequest) -> Sink:
    if req.datagrams is None:
        raise RuntimeError("UDP socket not open")
    ip = getattr(req.requester, "peer_ip", "127.0.0.1")
    return UdpSink(req.datagrams, (ip, req.udp_port), req.requester, req.datagram_fault)


def _mqtt(req: SinkRequest) -> Sink:
    return MqttSink(req.mqtt)


def _ffmpeg(req: SinkRequest) -> Sink:
    # §7.3: the sink is NOT switched to the stream client; data goes to the previous sink,
    # which after boot is USB serial.
    return _serial(req)


SINK_FACTORIES: Final[dict[Transport, Callable[[SinkRequest], Sink]]] = {
    Transport.TCP: _tcp,
    Transport.UDP: _udp,
    Transport.SERIAL: _serial,
    Transport.MQTT: _mqtt,
    Transport.FFMPEG: _ffmpeg,
}
