"""Test helpers for MQTT: a private mosquitto that a test may stop and restart, and a probe
that records every message of a real broker (aiomqtt, independent of the library's client).

The shared broker of ``scripts/services.sh`` (fixture ``mqtt_broker``) must never be
stopped by a test: other tests use it.  :class:`PrivateBroker` runs its own mosquitto on a
free port in a temporary directory, in the foreground, so the test owns its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateBroker:
    """A mosquitto this test owns: :meth:`stop` kills it (as a crashed broker), :meth:`start`
    brings it back on the same port."""

    def __init__(self, directory: Path) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it switches to a user that cannot run here
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = directory / "mosquitto.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=out, stderr=out)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"private mosquitto did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@dataclass(frozen=True)
class Message:
    at: float
    """time.time() when the probe received it."""
    topic: str
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode()


class Probe:
    """Subscribes to ``topic`` on a broker and keeps every message, in arrival order."""

    def __init__(self, host: str, port: int, topic: str = "powermeter/#") -> None:
        self.host, self.port, self.topic = host, port, topic
        self.messages: list[Message] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def __aenter__(self) -> Probe:
        self._client = aiomqtt.Client(self.host, self.port, identifier=f"probe-{os.getpid()}-{id(self)}")
        await self._client.__aenter__()
        await self._client.subscribe(self.topic)
        self._task = asyncio.get_running_loop().create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.messages.append(Message(time.time(), str(message.topic), payload))
            self._new.set()

    async def publish(self, topic: str, payload: str | bytes) -> None:
        assert self._client is not None
        await self._client.publish(topic, payload)

    def on(self, topic: str, since: int = 0) -> list[Message]:
        return [m for m in self.messages[since:] if m.topic == topic]

    async def wait(self, predicate: Callable[[Message], bool], timeout: float = 3.0,
                   since: int = 0) -> Message:
        """The first message from index ``since`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for m in self.messages[seen:]:
                if predicate(m):
                    return m
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching MQTT message within {timeout} s; got {self.messages[since:]}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), remaining)

    async def quiet(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
