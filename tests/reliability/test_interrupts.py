"""``RE.stop()`` and SIGINT in the middle of ``plans.synchronized_fly`` (issue 9, interrupts;
abort and pause are in tests/plans/test_interruptions.py).

Whatever interrupts the run, every meter must end idle (the emulator's ground truth), every
sample the meter sent must be recorded or declared missing, the run must be closed with the
right exit status, and the next fly must start at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bluesky.utils import RunEngineInterrupted

import plans

from ._support import assert_accounted, assert_idle, when_sampling

ROOT = Path(__file__).resolve().parents[2]


def test_stop_mid_fly_closes_the_run_as_success_with_every_sample_and_the_next_fly_starts(
    fleet_factory, smartmeters, engine, embedded_catalog
) -> None:
    fleet = fleet_factory(2)
    meters = smartmeters(fleet)
    thread = when_sampling(engine, engine.RE.stop)
    started = time.monotonic()
    with pytest.raises(RunEngineInterrupted):
        engine.RE(plans.synchronized_fly(meters, 30.0))
    took = time.monotonic() - started
    thread.join(10)
    (stop,) = engine.docs("stop")
    assert stop["exit_status"] == "success"  # RE.stop(): ended early on purpose
    assert took < 15
    assert_idle(fleet)
    run = embedded_catalog.client[stop["run_start"]]
    for i, meter in enumerate(meters):
        assert_accounted(run, meter, fleet.truth(i).sent_samples)
    again, seen = time.time(), len(engine.messages)
    (uid,) = engine.RE(plans.synchronized_fly(meters, 0.5))
    assert engine.docs("stop")[-1]["exit_status"] == "success"
    kickoff = next(t for t, msg in engine.messages[seen:] if msg.command == "kickoff")
    assert kickoff - again < 3.0  # at once: no leftover to wait for (a fresh fly: ~0.7 s)
    for i, meter in enumerate(meters):
        assert_accounted(embedded_catalog.client[uid], meter, fleet.truth(i).sent_samples)


SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    from tests.run_engines import RunEngine
    from bluesky.utils import RunEngineInterrupted
    import plans
    from smartmeter_ophyd.devices import SmartMeter
    from smartmeter_ophyd.emulator import EmulatorFleet

    docs = []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE.msg_hook = lambda msg: msg.command == "complete" and print("SAMPLING", flush=True)
    with EmulatorFleet(1, name_prefix="sig") as fleet, tempfile.TemporaryDirectory() as tmp:
        meter = SmartMeter(*fleet.addresses[0], name="m1", data_directory=tmp, timeout=3.0)
        try:
            try:
                RE(plans.synchronized_fly([meter], 60.0))
                outcome = "finished"
            except RunEngineInterrupted:
                outcome = RE.state
                if RE.state == "paused":
                    RE.abort("SIGINT")
            stops = [d for n, d in docs if n == "stop"]
            first = meter.last_summary
            truth = fleet.truth(0)
            result = {
                "outcome": outcome,
                "exit_status": stops[0]["exit_status"] if stops else None,
                "active": truth.active, "sent": truth.sent_samples,
                "received": first.received_samples, "missing": first.missing_declared,
            }
            RE(plans.synchronized_fly([meter], 0.5))
            result["next"] = [d for n, d in docs if n == "stop"][-1]["exit_status"]
            result["next_sent"] = fleet.truth(0).sent_samples
            result["next_received"] = meter.last_summary.received_samples
        finally:
            meter.destroy()
    print("RESULT", json.dumps(result), flush=True)
""")


def test_sigint_mid_fly_pauses_then_abort_leaves_the_meter_idle_and_the_next_fly_starts(
    tmp_path,
) -> None:
    script = tmp_path / "fly.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "SAMPLING", line + proc.stderr.read()
        time.sleep(0.5)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)  # bluesky: two Ctrl-C in a row pause at once
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert results, err[-3000:]
    result = json.loads(results[0][len("RESULT "):])
    assert result["outcome"] == "paused", result
    assert result["exit_status"] == "abort", result
    assert result["active"] is False, result
    assert result["received"] + result["missing"] == result["sent"] > 0, result
    assert result["next"] == "success", result
    assert result["next_received"] == result["next_sent"] > 0, result
    assert proc.returncode == 0, err[-3000:]
    assert took < 30
