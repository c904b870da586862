"""A small sample-level reference of how firmware 2.2 stores samples, in TRUE time.

Independent of ``smartmeter_ophyd.timing._model``: it walks the ADE lattice instant by
instant through RTC seconds (§4.3, §4.10), applies §6.5 corrections on the running count,
and writes the records a meter would log, with the true instant of every stored row.

Clocks (all relative to ``T0`` for precision):
* ADE: kept lattice sample q at ``start + phase + q * step / (1 + ade_ppm)``;
* RTC: restarted at the start and at each RTC-setting sync; edges 0.5, 1.5, ... RTC seconds
  later, an RTC second lasting ``1 / (1 + rtc_ppm)`` true seconds;
* ESP clock: reads true + ``offset`` at the start, and true + ``sync_error`` right after a
  sync; stamps are rounded to the millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from smartmeter_ophyd.protocol import decimation
from smartmeter_ophyd.timing import DeclaredGap, SessionRecords, SyncRecord

T0 = 1_700_000_500.0


@dataclass
class Sync:
    at: float
    """True instant (relative to T0) the sync completes."""
    error_s: float = 0.0
    """ESP clock minus true time right after it."""
    confidence_ms: float = 0.3
    sets_rtc: bool = True


@dataclass
class Firmware:
    rate: int
    duration_s: float
    start: float = 0.0137
    start_error_s: float = 0.0
    ade_ppm: float = 0.0
    rtc_ppm: float = 0.0
    ade_phase_s: float = 0.0
    latched: bool = False
    syncs: list[Sync] = field(default_factory=list)
    correct: bool = True
    """Queue §6.5 corrections as the firmware does (|offset| >= 9 ms, capped at 10)."""

    def run(self) -> Result:
        rate = self.rate
        if self.latched:
            step = (1_000_000 // rate) * 1e-6
        else:
            dec = decimation(rate)
            step = dec.keep_every / dec.internal_rate
        end = self.start + self.duration_s
        rtc_second = 1.0 / (1.0 + self.rtc_ppm * 1e-6)
        # RTC edges in true time.
        restarts = [self.start] + [s.at for s in self.syncs if s.sets_rtc]
        edges: list[float] = []
        for i, r in enumerate(restarts):
            stop = restarts[i + 1] if i + 1 < len(restarts) else end
            t = r + 0.5 * rtc_second
            while t < stop:
                edges.append(t)
                t += rtc_second
        edge = np.array(edges)
        bounds = np.concatenate(([self.start], edge, [end]))
        rows_true: list[np.ndarray] = []
        kinds: list[np.ndarray] = []
        tick = step  # latched: the ESP timer (its drift within a second is negligible)
        for i in range(bounds.size - 1):
            a, b = bounds[i], bounds[i + 1]
            if self.latched:
                first = a + (tick if i == 0 else 0.0)
                n = max(0, math.ceil((b - first) / tick - 1e-12))
                times = first + tick * np.arange(min(n, rate))
            else:
                lattice = step / (1.0 + self.ade_ppm * 1e-6)
                q0 = math.ceil((a - self.start - self.ade_phase_s) / lattice - 1e-12)
                q1 = math.ceil((b - self.start - self.ade_phase_s) / lattice - 1e-12)
                q = np.arange(q0, min(q1, q0 + rate))
                times = self.start + self.ade_phase_s + q * lattice
            rows_true.append(times)
            kinds.append(np.zeros(times.size, dtype=np.int8))
            missing = rate - times.size
            if 0 < missing < 5 and i + 1 < bounds.size - 1:
                rows_true.append(np.full(missing, b))
                kinds.append(np.full(missing, 2, dtype=np.int8))
        row_true = np.concatenate(rows_true)
        kind = np.concatenate(kinds)
        row_true, kind, records = self._corrections(row_true, kind, step)
        start_ts = _ms(T0 + self.start + self.start_error_s)
        counted = kind != 2
        return Result(self, row_true, kind, records, start_ts,
                      samples=int(np.count_nonzero(counted)), sent=int(row_true.size),
                      stop_ts=_ms(T0 + end))

    def _corrections(self, row_true: np.ndarray, kind: np.ndarray, step: float) -> tuple[
            np.ndarray, np.ndarray, list[SyncRecord]]:
        """Walk the syncs in order; apply pending corrections at count % rate == 1."""
        rate = self.rate
        records: list[SyncRecord] = []
        pending = 0
        out_true: list[np.ndarray] = []
        out_kind: list[np.ndarray] = []
        cursor = 0  # next input row
        count = 0
        start_ts = _ms(T0 + self.start + self.start_error_s)
        syncs = sorted(self.syncs, key=lambda s: s.at)
        for k in range(len(syncs) + 1):
            until = int(np.searchsorted(row_true, syncs[k].at, side="right")) if k < len(
                syncs) else row_true.size
            while cursor < until:
                if pending == 0 or rate == 1:
                    chunk = slice(cursor, until)
                    out_true.append(row_true[chunk])
                    out_kind.append(kind[chunk])
                    count += int(np.count_nonzero(kind[chunk] != 2))
                    cursor = until
                    break
                # Next counted row stored with count % rate == 1.
                need = (1 - count) % rate
                counted = np.flatnonzero(kind[cursor:until] != 2)
                if need >= counted.size:
                    chunk = slice(cursor, until)
                    out_true.append(row_true[chunk])
                    out_kind.append(kind[chunk])
                    count += counted.size
                    cursor = until
                    break
                at = cursor + int(counted[need])
                out_true.append(row_true[cursor:at])
                out_kind.append(kind[cursor:at])
                count += need
                if pending > 0:
                    out_true.append(row_true[at:at + 1].repeat(2))
                    out_kind.append(np.array([0, 1], dtype=np.int8))
                    count += 2
                    pending -= 1
                else:
                    pending += 1  # dropped: not stored, not counted
                cursor = at + 1
            if k == len(syncs):
                break
            s = syncs[k]
            to_ts = _ms(T0 + s.at + s.error_s)
            duration = round((to_ts - start_ts) * 1000) / 1000
            goal = int(np.float32(duration) * np.float32(rate))
            offset = (goal - count) / rate
            n = 0
            if self.correct and abs(offset) >= 0.009:
                n = max(-10, min(10, goal - count))
                pending += n
            records.append(SyncRecord(to_ts=to_ts, total=count, goal=goal, offset_s=offset,
                                      confidence_ms=s.confidence_ms, correction=n,
                                      sets_rtc=s.sets_rtc))
        return np.concatenate(out_true), np.concatenate(out_kind), records


def _ms(t: float) -> float:
    return round(t * 1000) / 1000


@dataclass
class Result:
    fw: Firmware
    true_rel: np.ndarray
    """True instant of each stored row, relative to T0."""
    kind: np.ndarray
    """0 sample, 1 duplicate, 2 filler."""
    syncs: list[SyncRecord]
    start_ts: float
    samples: int
    sent: int
    stop_ts: float

    def records(self, *, name: str = "m", gaps: tuple[DeclaredGap, ...] = (),
                received: int | None = None, **extra: object) -> SessionRecords:
        return SessionRecords(
            meter=name, rate=self.fw.rate, start_ts=self.start_ts,
            received=self.true_rel.size if received is None else received,
            syncs=tuple(self.syncs), gaps=gaps, latched=self.fw.latched,
            samples=self.samples, sent_samples=self.sent, stop_ts=self.stop_ts,
            **extra)  # type: ignore[arg-type]
