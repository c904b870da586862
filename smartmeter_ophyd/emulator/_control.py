"""Test-only control channel, outside the wire protocol: ground truth, clock/network, faults.

A JSON-lines TCP server on its own port (one per meter).  Each request is one JSON object
with an ``op``; each answer is one JSON line ``{"ok": true, ...}`` or
``{"ok": false, "error": "smartmeter <name>: ..."}`` naming the meter and the problem.  The
same operations exist in-process: as methods of :class:`EmulatedMeter`, the typed views
:func:`sample_times` and :func:`corrections` below, and :class:`EmulatorFleet`'s methods.

| op | arguments | effect / answer |
|---|---|---|
| ``status`` | — | name, ports, sampling, boot_count, time_valid |
| ``truth`` | ``npy`` (optional path) | ground truth of the current/last session; writes the produced samples to ``npy`` |
| ``clock`` | — | ``clock_error_s`` (software clock minus true time now), ``drift_ppm``, ``ade_drift_ppm``, ``rtc_drift_ppm``, ``synced`` |
| ``step_clock`` | ``delta_s`` | the meter's clock jumps by ``delta_s``; answers ``clock_error_s`` |
| ``set_network`` | ``delay_s``, ``jitter_s`` (each optional) | one-way delay/jitter to the time server; answers both |
| ``ntp_history`` | — | ``history``: every SNTP sync of this meter (true time, true error after, confidence, rtt) |
| ``sample_times`` | ``index`` or ``start``/``stop``; ``npz`` (optional path) | ``true_times`` and ``kinds`` of delivered rows (NaN → null); with ``npz`` written there instead |
| ``corrections`` | — | row indices of §6.5 duplicates and §4.10 fillers; true instants of §6.5 drops and §4.10 RTC drops; the §6.5 sync records; pending count |
| ``drop_connections`` | — | every TCP connection dies at once |
| ``stall`` | ``seconds`` | the meter's loop stops for that long (data piles up in the ring buffer) |
| ``reboot`` | — | as ``restart`` |
| ``garbage`` | ``hex`` | these bytes precede the next data frame |
| ``log_in_frame`` | ``text`` or ``next_logs`` | an INFO log line ``text`` is written in the middle of the next data frame; or the meter's own next ``next_logs`` log lines land inside the following frames (§4.6) |
| ``drop_udp`` | ``count`` | the next ``count`` UDP datagrams are not sent |
| ``duplicate_udp`` | ``count`` | each of the next ``count`` UDP datagrams arrives twice |
| ``reorder_udp`` | ``count`` | each of the next ``count`` UDP datagrams arrives after the one that follows it |

The three UDP ops are faults of the network between device and host, not firmware
behaviour: the meter's ``sent_samples`` (§4.8) counts each such datagram once.

Rows are numbered as delivered: index ``i`` is the ``i``-th sample row the meter put into its
ring buffer in this session (fillers and correction duplicates included, §4.10, §6.5), which
is the ``i``-th row a client receives when nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._sampling import SessionTruth, SyncRecord

if TYPE_CHECKING:
    from ._meter import EmulatedMeter

logger = logging.getLogger(__name__)

MAX_JSON_ROWS = 100_000
"""``sample_times`` answers at most this many rows as JSON; larger ranges need ``npz``."""


# ----------------------------------------------------------------- typed ground truth
@dataclass(frozen=True)
class SampleTimes:
    """True instants of delivered rows ``start .. start + len(true_times)``."""

    start: int
    true_times: np.ndarray
    """float64 unix seconds (true time): when the row's values were sampled; for a §6.5
    duplicate the instant of the sample it copies; for a §4.10 filler the instant of the RTC
    interrupt that appended it (see ``SessionTruth.true_times``)."""
    kinds: np.ndarray
    """uint8 per row: 0 sample, 1 correction duplicate (§6.5), 2 RTC filler (§4.10)."""


@dataclass(frozen=True)
class Corrections:
    """What the firmware's corrections did to the delivered rows of one session."""

    duplicates: np.ndarray
    """Row indices of the second copies stored by positive NTP corrections (§6.5)."""
    fillers: np.ndarray
    """Row indices of copies appended by the RTC interrupt for missing samples (§4.10)."""
    correction_drops: np.ndarray
    """True instants of samples not stored because of negative NTP corrections (§6.5)."""
    rtc_drops: np.ndarray
    """True instants of ADE samples the per-second counter refused (§4.10, uniform rates)."""
    sync_records: tuple[SyncRecord, ...]
    """The §6.5 records the meter logged in this session (goal, total, offset, queued)."""
    pending: int
    """Corrections queued by NTP syncs but not applied (yet, or before the session ended):
    positive = duplicates to come, negative = drops."""


def session_truth(meter: EmulatedMeter) -> SessionTruth:
    """The sampling engine's ground truth of the current or last session."""
    truth = meter.session_truth()
    if truth is None:
        raise LookupError(f"smartmeter {meter.name}: no sampling session has run yet")
    return truth


def sample_times(meter: EmulatedMeter, start: int = 0, stop: int | None = None) -> SampleTimes:
    """True instants of delivered rows ``[start, stop)`` (Python slice bounds, no negatives)."""
    truth = session_truth(meter)
    n = int(truth.true_times.shape[0])
    end = n if stop is None else int(stop)
    if not 0 <= int(start) <= end <= n:
        raise IndexError(
            f"smartmeter {meter.name}: rows [{start}, {stop}) are outside the {n} rows "
            "produced in this session"
        )
    return SampleTimes(int(start), truth.true_times[start:end].copy(), truth.kinds[start:end].copy())


def corrections(meter: EmulatedMeter) -> Corrections:
    truth = session_truth(meter)
    s = meter.session or meter.last_session
    assert s is not None
    return Corrections(
        duplicates=truth.correction_duplicates,
        fillers=truth.filler_indices,
        correction_drops=np.asarray(truth.correction_drops, dtype=float),
        rtc_drops=np.asarray(truth.rtc_drops, dtype=float),
        sync_records=tuple(truth.sync_records),
        pending=s.engine.pending_correction,
    )


# ------------------------------------------------------------------------ JSON ops
def _floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _number(meter: EmulatedMeter, req: dict[str, Any], key: str, default: Any = ...) -> Any:
    value = req.get(key, default)
    if value is ...:
        raise ValueError(f"smartmeter {meter.name}: op {req['op']!r} needs {key!r}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"smartmeter {meter.name}: {key!r} must be a number, not {value!r}")
    return value


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


def _clock(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    return {
        "clock_error_s": meter.clock_error_s(),
        "drift_ppm": meter.clock.drift_ppm,
        "ade_drift_ppm": meter.config.ade_drift_ppm,
        "rtc_drift_ppm": meter.config.rtc_drift_ppm,
        "synced": meter.clock.synced,
    }


def _step_clock(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    return {"clock_error_s": meter.step_clock(_number(meter, req, "delta_s"))}


def _set_network(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    delay, jitter = meter.set_network(
        _number(meter, req, "delay_s", None), _number(meter, req, "jitter_s", None)
    )
    return {"delay_s": delay, "jitter_s": jitter}


def _sample_times(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    if "index" in req:
        start = int(_number(meter, req, "index"))
        stop: int | None = start + 1
    else:
        start = int(_number(meter, req, "start", 0))
        stop_value = _number(meter, req, "stop", None)
        stop = None if stop_value is None else int(stop_value)
    times = sample_times(meter, start, stop)
    out: dict[str, Any] = {"start": times.start, "stop": times.start + len(times.true_times)}
    if (path := req.get("npz")) is not None:
        np.savez(str(path), true_times=times.true_times, kinds=times.kinds)
        out["npz"] = path
        return out
    if len(times.true_times) > MAX_JSON_ROWS:
        raise ValueError(
            f"smartmeter {meter.name}: {len(times.true_times)} rows exceed {MAX_JSON_ROWS} "
            "per JSON answer; ask a smaller range or give 'npz'"
        )
    out["true_times"] = _floats(times.true_times)
    out["kinds"] = times.kinds.tolist()
    return out


def _corrections(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    c = corrections(meter)
    return {
        "duplicates": c.duplicates.tolist(),
        "fillers": c.fillers.tolist(),
        "correction_drops": _floats(c.correction_drops),
        "rtc_drops": _floats(c.rtc_drops),
        "sync_records": [asdict(r) for r in c.sync_records],
        "pending": c.pending,
    }


def _ntp_history(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    return {"history": [asdict(r) for r in meter.ntp_history]}


def _stall(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.stall_output(float(_number(meter, req, "seconds")))
    return {}


def _garbage(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.inject_garbage(bytes.fromhex(str(req.get("hex", "deadbeef"))))
    return {}


def _log_in_frame(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    if "next_logs" in req:
        meter.move_next_logs_into_frames(int(_number(meter, req, "next_logs")))
    else:
        meter.inject_log_in_next_frame(str(req.get("text", "injected")))
    return {}


def _drop_udp(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.drop_udp_datagrams(int(_number(meter, req, "count")))
    return {}


def _duplicate_udp(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.duplicate_udp_datagrams(_count(meter, req))
    return {}


def _reorder_udp(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.reorder_udp_datagrams(_count(meter, req))
    return {}


def _count(meter: EmulatedMeter, req: dict[str, Any]) -> int:
    count = _number(meter, req, "count")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"smartmeter {meter.name}: 'count' must be an integer >= 0, not {count!r}")
    return count


def _drop_connections(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.drop_connections()
    return {}


def _reboot(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    meter.request_reboot()
    return {}


FAULTS: dict[str, Callable[[EmulatedMeter, dict[str, Any]], dict[str, Any]]] = {
    "drop_connections": _drop_connections,
    "stall": _stall,
    "reboot": _reboot,
    "garbage": _garbage,
    "log_in_frame": _log_in_frame,
    "drop_udp": _drop_udp,
    "duplicate_udp": _duplicate_udp,
    "reorder_udp": _reorder_udp,
}
"""The fault injections (shared by the control channel and ``EmulatorFleet.inject``)."""

OPS: dict[str, Callable[[EmulatedMeter, dict[str, Any]], dict[str, Any]]] = {
    "status": _status,
    "truth": lambda m, r: truth_dict(m, r.get("npy")),
    "clock": _clock,
    "step_clock": _step_clock,
    "set_network": _set_network,
    "ntp_history": _ntp_history,
    "sample_times": _sample_times,
    "corrections": _corrections,
    **FAULTS,
}


def run_op(meter: EmulatedMeter, req: dict[str, Any]) -> dict[str, Any]:
    """Run one control request; raises ``LookupError``/``ValueError``/... naming the problem."""
    op = OPS.get(req.get("op"))  # type: ignore[arg-type]
    if op is None:
        raise ValueError(
            f"smartmeter {meter.name}: unknown control op {req.get('op')!r}; ops: {sorted(OPS)}"
        )
    return op(meter, req)


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
        name = self.meter.name
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": f"smartmeter {name}: control request is not JSON: "
                                          f"{line[:200]!r}"}
        if not isinstance(req, dict):
            return {"ok": False, "error": f"smartmeter {name}: control request must be an "
                                          f"object with an 'op', not {line[:200]!r}"}
        try:
            return {"ok": True, **run_op(self.meter, req)}
        except (LookupError, ValueError, TypeError, OSError, RuntimeError) as exc:
            text = str(exc)
            if not text.startswith("smartmeter "):
                text = f"smartmeter {name}: {req.get('op')}: {text}"
            return {"ok": False, "error": text}
