"""bluesky's ``RunEngine`` for tests: its loop thread ends with the test that made it.

A ``bluesky.RunEngine`` made without a ``loop`` starts a new event loop on a daemon thread
(``bluesky-run-engine``) and never stops it, so every test that makes one would leak a
thread under the leak guard (tests/leak_guard.py).  Tests import ``RunEngine`` from here
instead; it is bluesky's, with :meth:`RunEngine.close` added, and the autouse fixture
``close_run_engines`` (tests/conftest.py) closes every one made during a test once the
test's own fixtures are torn down.

Closing (:func:`close_run_engine`, for any bluesky RunEngine that owns its loop) halts a run
left paused, stops the loop, joins its thread and closes the loop.

Limits: every engine made during a test is closed at its end, so an engine of a module- or
session-scoped fixture would not outlive the first test using it (no fixture has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import bluesky

JOIN_TIMEOUT_S = 10.0
_OPEN: list[RunEngine] = []


class RunEngine(bluesky.RunEngine):
    """bluesky's RunEngine whose event loop thread can be stopped (:meth:`close`)."""

    def __init__(self, md: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(md, **kwargs)
        _OPEN.append(self)

    def close(self) -> None:
        """Halt a paused run, stop the event loop and its thread, close the loop (idempotent)."""
        close_run_engine(self)


def close_run_engine(engine: Any, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Halt a paused run, stop ``engine``'s event loop and join its thread, close the loop.

    Idempotent.  Raises ``TimeoutError`` if the loop does not stop within ``timeout``.
    """
    loop: asyncio.AbstractEventLoop = engine.loop
    if loop.is_closed():
        return
    if engine.state == "paused":
        engine.halt()
    if loop.is_running():
        thread = asyncio.run_coroutine_threadsafe(_current_thread(), loop).result(timeout)
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the RunEngine's loop thread did not stop within {timeout} s")
    loop.close()


def close_all() -> None:
    """Close every RunEngine made since the last call (the first error is raised last)."""
    errors: list[BaseException] = []
    while _OPEN:
        engine = _OPEN.pop()
        try:
            engine.close()
        except Exception as error:  # close the others, then report
            errors.append(error)
    if errors:
        raise errors[0]


@contextlib.contextmanager
def closing_run_engines_in(namespace: dict[str, object]) -> Iterator[None]:
    """On exit, close every bluesky RunEngine bound in ``namespace`` (code run by ``exec``,
    such as a documentation page, makes its own with ``bluesky.RunEngine``)."""
    try:
        yield
    finally:
        for value in list(namespace.values()):
            if isinstance(value, bluesky.RunEngine):
                close_run_engine(value)


async def _current_thread() -> threading.Thread:
    return threading.current_thread()
