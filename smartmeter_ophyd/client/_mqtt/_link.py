"""The connection to the MQTT broker: connect, subscribe, receive, publish, reconnect.

An :class:`MqttLink` owns one aiomqtt client at a time and knows nothing of meters: every
message goes to ``on_message(topic, payload)``, a loss to ``on_lost(error)``, and it then
reconnects every ``reconnect_s`` until :meth:`close`.  aiomqtt connects from the loop's
default executor.  Needs the ``mqtt`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import MeterConnectionError

logger = logging.getLogger(__name__)


class MqttLink:
    """One broker connection that subscribes to ``topics`` and routes what arrives."""

    def __init__(self, host: str, port: int, *, topics: Sequence[str], timeout: float,
                 reconnect_s: float, client_args: dict[str, Any],
                 on_message: Callable[[str, Any], None],
                 on_lost: Callable[[BaseException], None]) -> None:
        try:
            import aiomqtt
        except ImportError as exc:
            raise RuntimeError(
                "MQTT needs aiomqtt: pip install 'smartmeter-ophyd[mqtt]'") from exc
        self._aiomqtt = aiomqtt
        self.host, self.port = host, port
        self.label = f"mqtt broker {host}:{port}"
        self.reconnect_s = reconnect_s
        self._topics = tuple(topics)
        self._client_args = {**client_args, "timeout": timeout}
        self._on_message = on_message
        self._on_lost = on_lost
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> None:
        """Connect and subscribe; :class:`MeterConnectionError` if the broker cannot be
        reached now (later losses are retried in the background)."""
        if self._task is not None:
            return
        try:
            await self._open()
        except self._aiomqtt.MqttError as exc:
            raise MeterConnectionError(self.label, f"cannot connect: {exc}") from exc
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.label)

    async def _open(self) -> None:
        # A fresh client per connection: aiomqtt keeps the old CONNACK future after a loss.
        self._client = self._aiomqtt.Client(self.host, self.port, **self._client_args)
        await self._client.__aenter__()
        try:
            for topic in self._topics:
                await self._client.subscribe(topic)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
            raise
        self._connected.set()
        logger.info("%s: connected", self.label)

    async def _run(self) -> None:
        aiomqtt = self._aiomqtt
        on_message = self._on_message
        while not self._closing:
            try:
                async for message in self._client.messages:
                    on_message(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                if self._closing:
                    return
                self._connected.clear()
                logger.warning("%s: connection lost (%s); reconnecting every %.1f s",
                               self.label, exc, self.reconnect_s)
                self._on_lost(exc)
                with contextlib.suppress(Exception):
                    await self._client.__aexit__(None, None, None)
            while not self._closing:
                await asyncio.sleep(self.reconnect_s)
                try:
                    await self._open()
                    break
                except aiomqtt.MqttError as exc:
                    logger.debug("%s: reconnect failed: %s", self.label, exc)

    async def publish(self, topic: str, payload: bytes, label: str) -> None:
        """QoS 0 (what the meter uses); :class:`MeterConnectionError` naming ``label``."""
        if not self._connected.is_set():
            raise MeterConnectionError(label, f"not connected to {self.label}")
        try:
            await self._client.publish(topic, payload, qos=0)
        except self._aiomqtt.MqttError as exc:
            raise MeterConnectionError(label, f"publish to {topic!r} failed: {exc}") from exc

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._connected.is_set():
            self._connected.clear()
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
