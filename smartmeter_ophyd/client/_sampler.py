"""Starting a sampling session: check the request, bind UDP, send ``sample``, wire the session.

:class:`Sampler` is the client's session factory.  It refuses locally what this connection
could never receive (MQTT, a serial session over TCP, unprefixed data on the command
connection, a scheduled start outside 0.5..20 s, §4.1, §4.6, §6.4), binds the UDP port
before ``sample`` is sent (§4.13), and creates the :class:`SamplingSession` the moment the
connection reports :class:`~smartmeter_ophyd.protocol.SessionStarted` -- inside dispatch,
before the frames that follow the reply are routed.

Limits: one session at a time per connection; a second ``sample`` while one runs or is
starting is refused without sending anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from ..protocol import (
    CommandError,
    Cts,
    DatagramDecoder,
    MessageReply,
    Reply,
    RequestSamples,
    Sample,
    SampleReply,
    SessionStarted,
    Stop,
    StopReply,
    Transport,
    check_start_window,
)
from ._errors import (
    MeterCommandError,
    MeterConnectionError,
    MeterProtocolError,
)
from ._model import SampleConfig
from ._session import SamplingSession
from ._stop_reply import judge_stop_reply
from ._transports import UdpReceiver, open_udp_receiver

if TYPE_CHECKING:
    from ._async import AsyncMeterClient

logger = logging.getLogger(__name__)

UDP_DRAIN_QUIET_S: Final = 0.25
UDP_DRAIN_MAX_S: Final = 2.0


class Sampler:
    """Creates and wires the sampling sessions of one client."""

    def __init__(self, client: AsyncMeterClient) -> None:
        self._client = client
        self._starting: tuple[Sample, UdpReceiver | None] | None = None
        self._created: SamplingSession | None = None

    async def start(self, config: SampleConfig | Sample) -> SamplingSession:
        client = self._client
        label = client.meter_label
        if (client.session is not None and client.session.active) or self._starting:
            raise MeterCommandError(label, "a sampling session is already running on this connection")
        link = client.keeper.link
        if link is None:
            raise MeterConnectionError(label, "not connected")
        transport = self._transport(config)
        problem = self._transport_problem(transport)
        if problem is None and not config.prefix and transport is not Transport.UDP:
            problem = (
                "prefix=False on a command connection cannot be framed (text lines interleave "
                "with the samples, §4.6, §4.12); use the raw stream (open_raw_stream) or UDP"
            )
        if problem is not None:
            raise MeterCommandError(label, problem)
        if config.start_time is not None:
            try:
                check_start_window(config.start_time, time.time())
            except CommandError as exc:
                raise MeterCommandError(label, str(exc)) from exc
        receiver: UdpReceiver | None = None
        if transport is Transport.UDP:
            try:
                receiver = await open_udp_receiver(
                    label, link.peer_host, link.local_host, config.port or 0
                )
            except OSError as exc:
                raise MeterConnectionError(
                    label, f"cannot bind UDP port {config.port or 0}: {exc}"
                ) from exc
        try:
            return await self._start(self._command(config, receiver), receiver)
        except BaseException:
            if receiver is not None:
                receiver.close()
            raise

    def _transport(self, config: SampleConfig | Sample) -> Transport:
        if isinstance(config, Sample):
            return config.transport
        try:
            return Transport(config.transport)
        except ValueError:
            raise MeterCommandError(
                self._client.meter_label,
                f"sample: transport={config.transport!r} is not allowed; allowed: "
                + ", ".join(t.value for t in Transport if t is not Transport.FFMPEG),
            ) from None

    def _command(self, config: SampleConfig | Sample, receiver: UdpReceiver | None) -> Sample:
        if isinstance(config, Sample):
            return config if receiver is None else dataclasses.replace(config, port=receiver.port)
        try:
            return config.to_command(receiver.port if receiver else None)
        except CommandError as exc:
            raise MeterCommandError(self._client.meter_label, str(exc)) from exc

    def _transport_problem(self, transport: Transport) -> str | None:
        """Why this connection could not receive a session over ``transport`` (None: it can)."""
        serial = self._client.keeper.serial
        if transport is Transport.MQTT:
            return (
                "MQTT sampling publishes one message per sample to the broker (§4.14); this "
                "client does not subscribe to MQTT -- use TCP, UDP or Serial"
            )
        if serial and transport is not Transport.SERIAL:
            return f"on a serial connection sample with transport Serial, not {transport.value}"
        if not serial and transport is Transport.SERIAL:
            return "Serial data goes to the USB port: use AsyncMeterClient.serial(device)"
        return None

    async def _start(self, command: Sample, receiver: UdpReceiver | None) -> SamplingSession:
        client = self._client
        self._starting = (command, receiver)
        try:
            answered = await client.requests.exchange(command, None)
        finally:
            self._starting = None
        session, self._created = self._created, None
        view = client.requests.check(command, answered.reply)
        if session is None or not isinstance(view, SampleReply):
            raise MeterProtocolError(client.meter_label, f"unusable sample reply: {answered.reply}")
        if receiver is not None:
            decoder = DatagramDecoder(
                view.measures.values_per_sample, view.chunk_size, bool(view.prefix)
            )
            receiver.attach(_datagram_sink(client, session, decoder))
        logger.info(
            "%s: sampling %s at %d Hz over %s (chunk %d bytes)",
            client.meter_label, view.measures.name, view.sampling_rate,
            command.transport.value, view.chunk_size,
        )
        return session

    def on_started(self, event: SessionStarted) -> None:
        """The connection says our ``sample`` succeeded: create the session now, so the
        frames right behind the reply already have a home."""
        starting = self._starting
        if starting is None or event.request.command is not starting[0]:
            return
        command, receiver = starting
        client = self._client
        try:
            view = client.requests.view(command, event.reply)
        except MeterProtocolError as exc:
            logger.warning("%s", exc)
            return
        if not isinstance(view, SampleReply) or not view.succeeded:
            return
        session = self._created = self._make_session(view, command, receiver)
        client._adopt_session(session, view.sampling_rate * view.measures.bytes_per_sample)

    def _make_session(
        self, view: SampleReply, command: Sample, receiver: UdpReceiver | None
    ) -> SamplingSession:
        client = self._client

        def ended(session: SamplingSession) -> None:
            client._session_ended(session)
            if receiver is not None:
                receiver.close()

        async def send_stop(timeout: float | None = None) -> StopReply:
            reply = (await client.requests.exchange(Stop(), timeout)).reply
            if not isinstance(reply, Reply):
                raise MeterProtocolError(client.meter_label, f"unusable stop reply: {reply!r}")
            # Frames the decoder still holds came before the reply; they are already routed.
            return judge_stop_reply(client.meter_label, reply)

        async def send_cts(ready: bool) -> None:
            await client.requests.typed(Cts(ready), MessageReply)

        async def send_request(n: int) -> None:
            client.requests.send_silent(client.requests.build(RequestSamples, n, view.measures))

        return SamplingSession(
            meter=client.meter_label,
            reply=view,
            transport=command.transport,
            send_stop=send_stop,
            send_cts=send_cts,
            send_request=send_request,
            drain=_udp_drainer(receiver) if receiver is not None else None,
            on_end=ended,
        )


def _udp_drainer(receiver: UdpReceiver) -> Callable[[], Awaitable[None]]:
    async def drain() -> None:
        # Datagrams still in flight when the TCP stop reply arrived (§4.8, §4.13).
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < UDP_DRAIN_MAX_S:
            await asyncio.sleep(0.05)
            last = receiver.last_datagram_at or start
            if loop.time() - last >= UDP_DRAIN_QUIET_S:
                return

    return drain


def _datagram_sink(
    client: AsyncMeterClient, session: SamplingSession, decoder: DatagramDecoder
) -> Callable[[bytes], None]:
    connection = client.keeper.connection

    def feed(data: bytes) -> None:
        if connection is not None:
            connection.stream_data_seen()  # lifeness after data now means stopped elsewhere
        session._feed(decoder.receive_datagram(data))

    return feed
