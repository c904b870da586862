"""Where the end of a fly goes: last meter stopped -> stop document -> run closed, by part.

N emulated meters (child processes, as ``fleet.py``) are flown in one
``plans.synchronized_fly`` into the embedded catalog (``catalog.document_sink()``). The
plan's end-of-run section (``plans._fly._final``: the final collects, the
``synchronization`` table, the ``meter_summary`` table, the ``alignment`` stream,
``close_run``) is timed message by message on the RunEngine's thread and, with
``--profile``, run under cProfile (everything that thread does meanwhile, the RunEngine's
message handling and the document subscribers included).

Printed per part (seconds): last meter's stop (its stop reply's ``stop_ts``, meter time,
NTP-synced to this host's chrony) -> the plan's final section, the final collects, the
``synchronization`` event, the ``alignment`` stream, ``meter_summary``, ``close_run`` ->
stop document, stop document -> run closed (the sink's wait).  The wall-time figure
``fleet.py`` checks is first sample -> closed <= duration + 1 s; this script prints the
tail of it.  Then the CPU used over that tail, by thread of this (acquisition) process and by
child process (alignment workers, catalog writer, emulators), and the least time that much
work needs on this host's cores however it is scheduled.

Usage: ``python benchmarks/end_of_run.py --meters 50 --seconds 10 [--profile 30] [--sample 25]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from _harness import CpuTimeline, Emulators, destroyed, host_load, loss_report, smartmeters
from bluesky import RunEngine

import plans
from plans import _fly
from smartmeter_ophyd.storage import open_catalog, setup_embedded_catalog

PARTS = (
    ("final", "last meter stopped -> final section"),
    ("collects", "final collects (from the final section's start)"),
    ("synchronization", "synchronization event"),
    ("alignment", "alignment stream"),
    ("meter_summary", "meter_summary event"),
    ("close", "close_run -> stop document"),
    ("closed", "stop document -> run closed"),
)


class StackSampler:
    """Every thread's Python stack, sampled every ``period`` s with wall-clock stamps, so
    that a window (last meter stopped -> run closed) can be cut from it afterwards."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.samples: list[tuple[float, str, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.period):
            now = time.time()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack: list[str] = []
                f: Any = frame
                while f is not None:
                    code = f.f_code
                    stack.append(f"{code.co_name} {Path(code.co_filename).name}:{f.f_lineno}")
                    f = f.f_back
                self.samples.append((now, names.get(ident, str(ident)), tuple(stack)))

    def report(self, start: float, end: float, lines: int) -> None:
        """Per thread: samples in the window, then the most frequent frames (inclusive) and
        innermost frames."""
        by_thread: dict[str, list[tuple[str, ...]]] = {}
        for t, name, stack in self.samples:
            if start <= t <= end:
                by_thread.setdefault(name, []).append(stack)
        for name, stacks in sorted(by_thread.items()):
            leaf = Counter(stack[0] for stack in stacks)
            inclusive = Counter(frame for stack in stacks for frame in set(stack))
            print(f"== thread {name}: {len(stacks)} samples ({self.period * 1e3:g} ms each)")
            for frame, count in leaf.most_common(6):
                print(f"   innermost {count:5d}  {frame}")
            for frame, count in inclusive.most_common(lines):
                print(f"   inclusive {count:5d}  {frame}")

    def timeline(self, start: float, end: float, bucket: float = 0.1) -> None:
        """Per 0.1 s from ``start``: what each busy thread was doing (its frame nearest the
        top of the stack among the project's own, or its innermost), '.' for waiting."""
        waiting = ("wait ", "select ", "_worker thread.py:81", "_wait_for_tstate_lock",
                   "acquire", "sleep")
        columns: dict[str, list[str]] = {}
        for t, name, stack in self.samples:
            if not start <= t <= end or not stack:
                continue
            k = int((t - start) / bucket)
            busy = not any(w in stack[0] for w in waiting)
            label = "."
            if busy:
                own = [f for f in stack if "site-packages" not in f and "python3.11" not in f]
                label = (own[0] if own else stack[0]).split(" ")[0]
            columns.setdefault(name, []).append(f"{k}:{label}")
        for name, entries in sorted(columns.items()):
            by_bucket: dict[int, Counter[str]] = {}
            for entry in entries:
                k, label = entry.split(":", 1)
                by_bucket.setdefault(int(k), Counter())[label] += 1
            row = [f"{k * bucket:4.1f}s {c.most_common(1)[0][0]}" for k, c in sorted(by_bucket.items())
                   if c.most_common(1)[0][0] != "."]
            print(f"== {name}: " + ("; ".join(row) if row else "waiting throughout"))


class Marks:
    """Wall-clock instants of the end-of-run messages (``msg_hook`` runs on the RE thread)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.in_final = False

    def hook(self, msg: Any) -> None:
        now = time.time()
        if msg.command == "close_run" and "final" in self.t:
            self.t.setdefault("close", now)  # after the final section's last message
        if not self.in_final:
            return
        name = msg.kwargs.get("name") if msg.kwargs else None
        if msg.command in ("declare_stream", "collect") and name in (
                "synchronization", "meter_summary"):  # tables: declared then collected
            self.t.setdefault(name, now)
        elif msg.command == "declare_stream" and name == "alignment":
            self.t.setdefault("alignment", now)

    def doc(self, name: str, _doc: dict[str, Any]) -> None:
        if name == "stop":
            self.t["stop"] = time.time()


def instrumented(marks: Marks, profile: cProfile.Profile | None) -> Any:
    original = _fly._final

    def final(setup: Any, state: Any, *rest: Any) -> Generator[Any, Any, None]:
        marks.t["final"] = time.time()
        marks.in_final = True
        if profile is not None:
            profile.enable()
        try:
            yield from original(setup, state, *rest)
        finally:
            if profile is not None:
                profile.disable()
            marks.in_final = False

    return original, final


def parts(marks: Marks, stopped: float, closed: float) -> dict[str, float]:
    """Seconds from each mark to the next one, in the order they came."""
    t = sorted(marks.t.items(), key=lambda item: item[1])
    out = {"final": t[0][1] - stopped}
    names = {"final": "collects", "synchronization": "synchronization",
             "alignment": "alignment", "meter_summary": "meter_summary", "close": "close"}
    for (a, ta), (_b, tb) in zip(t, t[1:], strict=False):
        out[names[a]] = tb - ta
    out["closed"] = closed
    return out


def print_budget(used: dict[str, float], seconds: float) -> None:
    """The CPU the tail took, by process and thread, and the least time it needs on this
    host's cores if all of it ran in parallel."""
    cores = os.cpu_count() or 1
    total = sum(used.values())
    print(f"CPU from the last stop to the run's close ({seconds:.3f} s): {total:.2f} s on "
          f"{cores} cores ({100 * total / (cores * seconds):.0f} % of them), so at least "
          f"{total / cores:.2f} s however it is scheduled:")
    for key, value in sorted(used.items(), key=lambda item: -item[1]):
        if value >= 0.005:
            print(f"  {key:48s} {value:6.2f} s")


def print_cpu_timeline(cpu: CpuTimeline, start: float, end: float, bucket: float = 0.1) -> None:
    """Per ``bucket`` s from ``start``: the CPU each process or thread used (% of one core),
    for those that used at least 5 % of a core over the whole window."""
    total = cpu.used(start, end)
    keys = [k for k, v in sorted(total.items(), key=lambda item: -item[1])
            if v >= 0.05 * (end - start)]
    print("CPU per 0.1 s from the last meter's stop (% of one core):")
    print("  " + "t (s)".rjust(6) + "".join(k.removeprefix("acquisition: ")[-14:].rjust(15)
                                          for k in keys))
    t = start
    while t < end:
        used = cpu.used(t, min(t + bucket, end))
        width = min(t + bucket, end) - t
        print(f"  {t - start:6.1f}" + "".join(f"{100 * used.get(k, 0.0) / width:15.0f}"
                                               for k in keys))
        t += bucket


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", type=int, default=0, metavar="LINES",
                        help="profile the final section; print this many lines by cumulative time")
    parser.add_argument("--sample", type=int, default=0, metavar="LINES",
                        help="sample every thread's stack from the last stop to the run's close; "
                             "print this many frames per thread")
    parser.add_argument("--keep", action="store_true",
                        help="keep the catalog and the meters' files (their directory is printed)")
    parser.add_argument("--inline-alignment", action="store_true",
                        help="compute the alignment when it is collected, not on a worker thread")
    args = parser.parse_args(argv)
    if args.inline_alignment:
        from smartmeter_ophyd.devices import AlignmentStream

        AlignmentStream.start = lambda self: None  # type: ignore[method-assign]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="smartmeter-end-"))
    catalog = setup_embedded_catalog(work / "catalog", "smartmeter-end",
                                     profiles_dir=work / "profiles")
    sink = catalog.document_sink()
    sink.wait_ready()
    marks = Marks()
    profile = cProfile.Profile() if args.profile else None
    original, final = instrumented(marks, profile)
    _fly._final = final
    try:
        print(f"host: {host_load()}; {args.meters} meters x 8 kHz x 6 channels, "
              f"{args.seconds:g} s", flush=True)
        with Emulators(args.meters) as emulators:
            meters = smartmeters(emulators.described, catalog)
            with destroyed(meters):
                engine = RunEngine({})
                engine.subscribe(marks.doc)  # first: it marks the stop before the sink waits
                engine.subscribe(sink)
                engine.msg_hook = marks.hook
                sampler = StackSampler()
                t0 = time.monotonic()
                with (sampler if args.sample else contextlib.nullcontext(),
                      CpuTimeline() as cpu):
                    (uid,) = engine(plans.synchronized_fly(meters, args.seconds))
                returned = time.time()
                wall = time.monotonic() - t0
                stopped = max(m.last_summary.stop_ts for m in meters
                              if m.last_summary is not None)
                client = open_catalog(catalog.profile)
                try:
                    losses = loss_report(meters, client[uid])
                finally:
                    client.context.close()
    finally:
        _fly._final = original
        catalog.close()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"host: {host_load()}; RunEngine wall {wall:.2f} s; zero loss "
          f"{all(loss.zero for loss in losses)}")
    measured = parts(marks, stopped, sink.last_close_s)
    labels = dict(PARTS)
    for key, seconds in measured.items():  # in the order they came
        print(f"  {labels[key]:48s} {seconds:6.3f} s")
    print(f"last meter stopped -> run closed (RunEngine returned): {returned - stopped:.3f} s")
    print_budget(cpu.used(stopped, returned), returned - stopped)
    print_cpu_timeline(cpu, stopped, returned)
    if args.sample:
        sampler.report(stopped, returned, args.sample)
        print("timeline from the last meter's stop (per 0.1 s, the most frequent busy frame):")
        sampler.timeline(stopped, returned)
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
