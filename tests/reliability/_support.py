"""Shared checks of the reliability tests: act while a fly samples, and account for every
sample of a run against the emulator's ground truth."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from smartmeter_ophyd.readback import meter_rows
from smartmeter_ophyd.storage import read_stream


def when_sampling(
    engine: Any, action: Callable[[], None], after_s: float = 0.5
) -> threading.Thread:
    """Run ``action()`` on another thread ``after_s`` after the plan sent its ``complete``s."""

    def wait_then_act() -> None:
        deadline = time.monotonic() + 30
        while not engine.commands("complete") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(after_s)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def assert_idle(fleet: Any) -> None:
    for name in fleet.names:
        assert not fleet.truth(name).active, f"{name} is still sampling"


def run_summary(run: Any, meter: Any) -> dict[str, Any]:
    """The meter's last row (its last segment) of the run's ``meter_summary`` table."""
    return meter_rows(run["meter_summary"].read())[meter.name][-1]


def assert_accounted(run: Any, meter: Any, produced: int) -> dict[str, Any]:
    """Received + declared missing == ``produced`` (ground truth), in the catalog too."""
    summary = run_summary(run, meter)
    stored = read_stream(run, meter.name, prefix=meter.name).sizes["time"]
    assert stored == summary["received_samples"], (meter.name, stored, summary)
    assert summary["received_samples"] + summary["missing_samples"] == produced, summary
    return summary
