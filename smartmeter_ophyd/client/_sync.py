"""Blocking facade: the same :class:`AsyncMeterClient`, run on the shared loop thread.

There is one implementation (the asyncio client); :class:`MeterClient` runs each call on
the process's one client loop thread (:class:`SharedLoop`) and waits for the result with a
timeout.  Its command methods are not listed here: they come from the command table
(:class:`~._commands.MeterCommands`) with the same signatures as the async ones.  When a
call fails, the client's own error is raised (a :class:`MeterTimeoutError` of the client
is never replaced by the facade's own wait limit).  ``close()`` of the last client stops
the loop and joins the thread: no thread is left behind.  Iterating a
:class:`SyncSamplingSession` yields :class:`Block` values.

Callbacks given to ``subscribe_logs``/``subscribe_events`` run on the loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from ..protocol import COMMAND_PORT, DeviceInfo, LogLine, Sample
from ._async import AsyncMeterClient
from ._commands import CommandMethod, MeterCommands, P
from ._errors import MeterTimeoutError
from ._model import ClientEvent, SampleConfig
from ._session import Block, BufferFill, SamplingSession
from ._summary import SessionSummary

logger = logging.getLogger(__name__)

_R = TypeVar("_R")

_GRACE_S = 1.0
"""Extra wait on top of the client's own timeout, so its typed error arrives first."""


class _LoopThread:
    """An event loop running forever on a daemon thread until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        # One I/O thread for blocking work of every meter (HDF5 writes): threads do not grow
        # with the number of meters.
        self.loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-io")
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, _R], timeout: float | None, what: str,
            meter: Callable[[], str]) -> _R:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():
                raise  # the coroutine's own timeout error (MeterTimeoutError is a TimeoutError)
            future.cancel()
            raise MeterTimeoutError(meter(), f"{what} did not finish within {timeout} s") from None

    def call(self, fn: Callable[[], _R]) -> _R:
        if threading.current_thread() is self._thread:
            return fn()

        async def wrapper() -> _R:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread


class SharedLoop:
    """The one event-loop thread that every :class:`MeterClient` of this process runs on.

    Meters cost sockets and a few tasks, not threads: a run of 50 meters has one loop
    thread.  The thread starts with the first client and stops (and is joined) when the
    last client closes, so nothing is left behind between runs.
    """

    _lock = threading.Lock()
    _thread: _LoopThread | None = None
    _users = 0

    @classmethod
    def acquire(cls) -> _LoopThread:
        with cls._lock:
            if cls._thread is None or not cls._thread.alive:
                cls._thread = _LoopThread(name="smartmeter-clients")
                cls._users = 0
            cls._users += 1
            return cls._thread

    @classmethod
    def release(cls, thread: _LoopThread) -> None:
        with cls._lock:
            if thread is not cls._thread:
                thread.stop()
                return
            cls._users -= 1
            if cls._users > 0:
                return
            cls._thread = None
        thread.stop()


class MeterClient(MeterCommands):
    """Blocking client of one SmartMeter; same methods as :class:`AsyncMeterClient`.

    Each call waits at most three times its timeout (+1 s) on the loop thread; the client's
    own, shorter timeouts fire first.
    """

    def __init__(self, host: str, port: int = COMMAND_PORT, **kwargs: Any) -> None:
        self._thread = SharedLoop.acquire()
        self._closed = False
        self._timeout = float(kwargs.get("timeout", 5.0))

        async def build() -> AsyncMeterClient:
            return AsyncMeterClient(host, port, **kwargs)

        self._client = self._thread.run(build(), None, "setup", lambda: f"{host}:{port}")

    @classmethod
    def serial(cls, device: str, **kwargs: Any) -> MeterClient:
        """Blocking client on a serial device (see :meth:`AsyncMeterClient.serial`)."""
        self = cls.__new__(cls)
        self._thread = SharedLoop.acquire()
        self._closed = False
        self._timeout = float(kwargs.get("timeout", 5.0))

        async def build() -> AsyncMeterClient:
            return AsyncMeterClient.serial(device, **kwargs)

        self._client = self._thread.run(build(), None, "setup", lambda: device)
        return self

    def _run(self, coro: Coroutine[Any, Any, _R], what: str, timeout: float | None = None) -> _R:
        limit = (self._timeout if timeout is None else timeout) * 3 + _GRACE_S
        return self._thread.run(coro, limit, what, lambda: self._client.meter_label)

    def _bind_command(self, method: CommandMethod[P, _R]) -> Callable[P, _R]:
        impl = method.impl

        @functools.wraps(impl)
        def call(*args: P.args, **kwargs: P.kwargs) -> _R:
            timeout = kwargs.get("timeout")
            return self._run(impl(self._client, *args, **kwargs), method.name,
                             timeout if isinstance(timeout, int | float) else None)

        return call

    # properties read on the loop thread's objects (immutable values)
    @property
    def info(self) -> DeviceInfo | None:
        return self._client.info

    @property
    def meter_label(self) -> str:
        return self._client.meter_label

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def async_client(self) -> AsyncMeterClient:
        """The underlying client (use it only from the loop thread)."""
        return self._client

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the client runs on (shared by every client of this process)."""
        return self._thread.loop

    def submit(self, coro: Coroutine[Any, Any, _R]) -> concurrent.futures.Future[_R]:
        """Run ``coro`` on the client's loop; the future completes with its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._thread.loop)

    def run(self, coro: Coroutine[Any, Any, _R], what: str, timeout: float | None = None) -> _R:
        """Run ``coro`` on the client's loop and wait for it (bounded by the client's timeout)."""
        return self._run(coro, what, timeout)

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread.thread

    def __repr__(self) -> str:
        return f"<MeterClient {self._client.meter_label}>"

    def connect(self) -> DeviceInfo:
        """Connect and read the info line (see :meth:`AsyncMeterClient.connect`)."""
        return self._run(self._client.connect(), "connect")

    def sample(
        self, config: SampleConfig | Sample | None = None, /, **settings: Any
    ) -> SyncSamplingSession:
        """Start sampling (see :meth:`AsyncMeterClient.sample`); returns a blocking session."""
        session = self._run(self._client.sample(config, **settings), "sample")
        return SyncSamplingSession(self, session)

    def subscribe_logs(self, callback: Callable[[LogLine], None]) -> Callable[[], None]:
        """As :meth:`AsyncMeterClient.subscribe_logs`; ``callback`` runs on the loop thread."""
        unsubscribe = self._thread.call(lambda: self._client.subscribe_logs(callback))
        return lambda: self._thread.call(unsubscribe)

    def subscribe_events(self, callback: Callable[[ClientEvent], None]) -> Callable[[], None]:
        unsubscribe = self._thread.call(lambda: self._client.subscribe_events(callback))
        return lambda: self._thread.call(unsubscribe)

    def close(self) -> None:
        """Close the connection; the last client of the process also stops the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.alive:
                self._run(self._client.close(), "close")
        finally:
            SharedLoop.release(self._thread)

    def __enter__(self) -> MeterClient:
        try:
            self.connect()
        except BaseException:
            self.close()  # __exit__ will not run: do not leave the loop thread behind
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            logger.warning("MeterClient garbage-collected without close()")


class SyncSamplingSession:
    """Blocking view of a :class:`SamplingSession`; iterating yields :class:`Block` values."""

    def __init__(self, client: MeterClient, session: SamplingSession) -> None:
        self._client = client
        self.session = session
        self._pending: concurrent.futures.Future[Block | None] | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        return self.session.channels

    @property
    def summary(self) -> SessionSummary | None:
        return self.session.summary

    def next_block(self, timeout: float | None = None) -> Block | None:
        """The next block (None at the end); waits at most ``timeout`` (default 4 × the
        client's timeout) and raises :class:`MeterTimeoutError` -- also while paused.

        If the loop thread is too slow to answer in time, the request is *not* cancelled
        (a block it already took off the session would be lost): it stays pending and the
        next call returns its result first, so blocks are never dropped nor reordered.
        """
        wait = timeout if timeout is not None else self._client._timeout * 4
        future = self._pending
        self._pending = None
        if future is None:
            future = asyncio.run_coroutine_threadsafe(
                self.session.next_block(wait), self._client._thread.loop
            )
        try:
            return future.result(wait * 3 + _GRACE_S)
        except TimeoutError:  # also concurrent.futures.TimeoutError (the same class since 3.11)
            if future.done():
                raise  # the session's own MeterTimeoutError: the request is over
            self._pending = future
            raise MeterTimeoutError(
                self._client.meter_label, f"next_block did not finish within {wait} s"
            ) from None

    def __iter__(self) -> Iterator[Block]:
        while True:
            block = self.next_block()
            if block is None:
                return
            yield block

    def stop(self, timeout: float | None = None) -> SessionSummary:
        """Stop the session and reconcile it (see :meth:`SamplingSession.stop`)."""
        return self._client._run(self.session.stop(timeout), "stop", timeout)

    def cts(self, ready: bool) -> None:
        self._client._run(self.session.cts(ready), "cts")

    def request_samples(self, n: int) -> None:
        self._client._run(self.session.request_samples(n), "request_samples")

    def buffer_fill_estimate(self) -> BufferFill:
        return self.session.buffer_fill_estimate()
