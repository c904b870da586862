"""The blocking facade of :class:`AsyncMqttBroker`, on the process's shared client loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine
from typing import Any, TypeVar

from ...protocol import Command, ReplyView
from .._sync import SharedLoop
from ._broker import AsyncMqttBroker
from ._messages import MeterState, MeterStatus, MqttReading

_R = TypeVar("_R")


class MqttBroker:
    """:class:`AsyncMqttBroker` for plain code, on the process's shared client loop."""

    def __init__(self, host: str, port: int = 1883, **kwargs: Any) -> None:
        self._thread = SharedLoop.acquire()
        self._released = False

        async def build() -> AsyncMqttBroker:
            broker = AsyncMqttBroker(host, port, **kwargs)
            await broker.connect()
            return broker

        try:
            self.async_broker = self._run(build(), "connect")
        except BaseException:
            self._release()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._thread.loop

    def _run(self, coro: Coroutine[Any, Any, _R], what: str, timeout: float | None = None) -> _R:
        limit = (timeout if timeout is not None else 5.0) + 1.0
        return self._thread.run(coro, limit, what, lambda: f"mqtt broker ({what})")

    def request(self, meter: str, command: Command, *, timeout: float | None = None
                ) -> ReplyView | None:
        m = self.async_broker.meter(meter)
        return self._run(m.request(command, timeout=timeout), command.name,
                         m.timeout if timeout is None else timeout)

    def broadcast(self, command: Command, *, window_s: float = 1.0,
                  expect: Collection[str] | None = None) -> dict[str, ReplyView]:
        return self._run(self.async_broker.broadcast(command, window_s=window_s, expect=expect),
                         "broadcast", window_s)

    def state(self, meter: str, *, timeout: float | None = None) -> MeterState:
        m = self.async_broker.meter(meter)
        return self._run(m.state(timeout=timeout), "state", m.timeout if timeout is None else timeout)

    def reading(self, meter: str, quantity: str = "p", *, timeout: float | None = None) -> MqttReading:
        m = self.async_broker.meter(meter)
        return self._run(m.reading(quantity, timeout=timeout), "reading",
                         m.timeout if timeout is None else timeout)

    def next_status(self, meter: str, *, timeout: float | None = None) -> MeterStatus:
        limit = self.async_broker.timeout if timeout is None else timeout
        return self._run(self.async_broker.next_status(meter, timeout=limit), "status", limit)

    def status(self, meter: str) -> MeterStatus | None:
        return self.async_broker.statuses.get(meter)

    def subscribe_status(self, callback: Callable[[MeterStatus], None], *,
                         meter: str | None = None) -> Callable[[], None]:
        """``callback`` runs on the loop thread."""
        return self._thread.call(lambda: self.async_broker.subscribe_status(callback, meter=meter))

    def _release(self) -> None:
        if not self._released:
            self._released = True
            SharedLoop.release(self._thread)

    def close(self) -> None:
        if self._released:
            return
        try:
            self._run(self.async_broker.close(), "close")
        finally:
            self._release()

    def __enter__(self) -> MqttBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
