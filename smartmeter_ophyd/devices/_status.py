"""Coroutines on the client's event loop, seen by bluesky as ophyd Statuses.

The device layer does its I/O as coroutines on the shared client loop
(:class:`~smartmeter_ophyd.client.MeterClient.submit`); :func:`status_from_coroutine` hands
the RunEngine a ``DeviceStatus`` that finishes with the coroutine, fails with its exception,
and cancels it when the status is failed from outside (``RE.abort()`` fails pending statuses).
No thread is started per operation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any

from ophyd.status import DeviceStatus

from ..client import MeterClient


def status_from_coroutine(
    device: Any,
    client: MeterClient,
    coro: Coroutine[Any, Any, Any],
    *,
    status: DeviceStatus | None = None,
) -> DeviceStatus:
    """Run ``coro`` on ``client``'s loop; the returned status follows it."""
    status = status if status is not None else DeviceStatus(device, call_stop_on_failure=False)
    future = client.submit(coro)
    link_future(status, future)
    return status


def link_future(status: DeviceStatus, future: concurrent.futures.Future[Any]) -> None:
    """Finish ``status`` with ``future``; cancel ``future`` if ``status`` is failed first."""

    def finished(done: concurrent.futures.Future[Any]) -> None:
        if status.done:
            return
        if done.cancelled():
            status.set_exception(asyncio.CancelledError("cancelled"))
            return
        exc = done.exception()
        if exc is None:
            status.set_finished()
        else:
            status.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def settled(st: DeviceStatus) -> None:
        if not future.done() and not st.success:
            future.cancel()

    future.add_done_callback(finished)
    status.add_callback(settled)
