"""Test-only control channel, outside the wire protocol: ground truth and fault injection.

A JSON-lines TCP server on its own port (one per meter).  Each request is one JSON object
with an ``op``; each answer is one JSON line ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.  The same operations exist as methods of
:class:`EmulatedMeter` for in-process tests.

| op | arguments | effect / answer |
|---|---|---|
| ``status`` | — | name, ports, sampling, boot_count, time_valid |
| ``truth`` | ``npy`` (optional path) | ground truth of the current/last session; writes the produced samples to ``npy`` |
| ``drop_connections`` | — | every TCP connection dies at once |
| ``stall`` | ``seconds`` | the meter's loop stops for that long (data piles up in the ring buffer) |
| ``reboot`` | — | as ``restart`` |
| ``garbage`` | ``hex`` | these bytes precede the next data frame |
| ``log_in_frame`` | ``text`` | an INFO log line is written in the middle of the next data frame |
| ``drop_udp`` | ``count`` | the next ``count`` UDP datagrams are not sent |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._meter import EmulatedMeter

logger = logging.getLogger(__name__)


def truth_dict(meter: EmulatedMeter, npy: str | None = None) -> dict[str, Any]:
    truth = meter.truth()
    if truth is None:
        raise LookupError(f"smartmeter {meter.name}: no sampling session has run yet")
    out = {k: v for k, v in asdict(truth).items() if k != "values"}
    out["n_values"] = int(truth.values.shape[0])
    if npy is not None:
        meter.save_truth_values(npy)
        out["npy"] = npy
    return out


def _status(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    return {
        **meter.describe(),
        "sampling": meter.sampling,
        "boot_count": meter.boot_count,
        "time_valid": meter.time_valid,
        "ready": meter.ready.is_set(),
    }


def _stall(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.stall_output(float(req["seconds"]))
    return {}


def _garbage(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.inject_garbage(bytes.fromhex(str(req.get("hex", "deadbeef"))))
    return {}


def _log_in_frame(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.inject_log_in_next_frame(str(req.get("text", "injected")))
    return {}


def _drop_udp(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.drop_udp_datagrams(int(req["count"]))
    return {}


def _drop_connections(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.drop_connections()
    return {}


def _reboot(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.request_reboot()
    return {}


OPS: dict[str, Callable[[EmulatedMeter, dict[str, Any]], dict[str, Any]]] = {
    "status": _status,
    "truth": lambda m, r: truth_dict(m, r.get("npy")),
    "drop_connections": _drop_connections,
    "stall": _stall,
    "reboot": _reboot,
    "garbage": _garbage,
    "log_in_frame": _log_in_frame,
    "drop_udp": _drop_udp,
}


class ControlServer:
    """JSON-lines server bound to ``host:port`` (0 = ephemeral)."""

    def __init__(self, meter: EmulatedMeter, host: str, port: int) -> None:
        self.meter = meter
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while line := await reader.readline():
                writer.write(json.dumps(self.handle(line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            op = OPS[req["op"]]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"bad control request {line[:200]!r}; ops: {sorted(OPS)}"}
        try:
            return {"ok": True, **op(self.meter, req)}
        except (LookupError, ValueError, OSError, RuntimeError) as exc:
            return {"ok": False, "error": str(exc)}
