"""PeriodicSync: one status per period for every meter's NTP sync, keeping none of them.

The meters here are stand-ins whose ``ntp.trigger()`` hands out ophyd statuses the test
finishes or fails itself; the real syncs through the emulator fleet are in
``test_fly_modes.py``.
"""

from __future__ import annotations

import gc
import logging
import weakref

from ophyd.status import DeviceStatus

from plans._periodic import PeriodicSync


class Ntp:
    def __init__(self, name: str) -> None:
        self.name = f"{name}_ntp"
        self.statuses: list[DeviceStatus] = []

    def trigger(self) -> DeviceStatus:
        status = DeviceStatus(self)
        self.statuses.append(status)
        return status


class Meter:
    def __init__(self, name: str) -> None:
        self.name = name
        self.meter_label = f"{name} (127.0.0.1)"
        self.ntp = Ntp(name)


def test_the_period_status_finishes_when_every_sync_has_and_counts_each_outcome(caplog) -> None:
    m1, m2 = Meter("m1"), Meter("m2")
    periodic = PeriodicSync([m1, m2])
    status = periodic.trigger()
    assert not status.done and periodic.sent == {"m1": 1, "m2": 1}
    m1.ntp.statuses[-1].set_finished()
    assert not status.done
    with caplog.at_level(logging.WARNING, logger="plans._periodic"):
        m2.ntp.statuses[-1].set_exception(RuntimeError("Error syncing time"))
        status.wait(1)
    assert status.success  # a failed sync is a missing record, not the end of the run
    assert periodic.failed == {"m1": 0, "m2": 1}
    assert "m2 (127.0.0.1): periodic NTP sync failed: Error syncing time" in caplog.text


def test_a_meter_whose_previous_sync_still_runs_is_skipped_with_a_warning(caplog) -> None:
    m1, m2 = Meter("m1"), Meter("m2")
    periodic = PeriodicSync([m1, m2])
    periodic.trigger()
    m1.ntp.statuses[-1].set_finished()
    with caplog.at_level(logging.WARNING, logger="plans._periodic"):
        second = periodic.trigger()
    assert periodic.sent == {"m1": 2, "m2": 1}
    assert len(m2.ntp.statuses) == 1
    assert "m2 (127.0.0.1): the previous periodic NTP sync is still running; skipped" in caplog.text
    m1.ntp.statuses[-1].set_finished()
    second.wait(1)


def test_nothing_to_start_finishes_at_once() -> None:
    (meter,) = meters = [Meter("m1")]
    periodic = PeriodicSync(meters)
    periodic.trigger()
    assert periodic.trigger().done  # the only meter is still syncing
    meter.ntp.statuses[-1].set_finished()


def test_finished_syncs_are_released_while_the_period_statuses_live() -> None:
    # The RunEngine keeps every period's status until the next plan: they must not keep the
    # meters' sync statuses (and their records) alive.
    (meter,) = meters = [Meter("m1")]
    periodic = PeriodicSync(meters)
    kept, syncs = [], []
    for _ in range(5):
        kept.append(periodic.trigger())
        sync = meter.ntp.statuses.pop()
        sync.set_finished()
        syncs.append(weakref.ref(sync))
        del sync
    gc.collect()
    assert all(status.done for status in kept)
    assert [ref() is None for ref in syncs] == [True] * 4 + [False]  # only the latest is held
