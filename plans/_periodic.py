"""The fly's periodic NTP syncs (§6.5), triggered as one object per period.

The firmware never syncs on its own while it samples (§6.5), so a fly asks every meter for a
sync each ``ntp_period``.  The RunEngine keeps every status a plan triggers and does not wait
for until the next plan starts, and a meter's sync status holds that sync's log lines and
record (~24 kB).  One trigger per meter and period therefore made a fly's memory grow with
its length.  :class:`PeriodicSync` is triggered once per period for all meters.  Its status
finishes when their syncs have, successfully or not (a failed periodic sync is a missing
record, never the end of the run), and refers to none of them.  Per meter it keeps only two
counts and the sync still running.
"""

import logging
import threading
from collections.abc import Sequence
from typing import Any

from ophyd.status import Status

from . import _validate as check
from ._settle import exception_of

logger = logging.getLogger(__name__)


class PeriodicSync:
    """Every meter's periodic NTP sync (``meter.ntp``) of one fly segment."""

    def __init__(self, meters: Sequence[Any], name: str = "periodic_ntp") -> None:
        self.meters = list(meters)
        self.name = name
        self.parent = None
        self.sent: dict[str, int] = {meter.name: 0 for meter in self.meters}
        """Syncs started, per meter."""
        self.failed: dict[str, int] = {meter.name: 0 for meter in self.meters}
        """Syncs that failed, per meter (logged as a warning when they do)."""
        self._running: dict[str, Any] = {}
        self._lock = threading.Lock()

    def trigger(self) -> Status:
        """Start a sync on each meter whose previous one is done; skip (and warn) the others."""
        status = Status(obj=self)
        started = []
        for meter in self.meters:
            previous = self._running.get(meter.name)
            if previous is not None and not previous.done:
                logger.warning("%s: the previous periodic NTP sync is still running; skipped",
                               check.label(meter))
                continue
            started.append((meter, meter.ntp.trigger()))
            self.sent[meter.name] += 1
        if not started:
            status.set_finished()
            return status
        pending = [len(started)]
        for meter, sync in started:
            self._running[meter.name] = sync
            sync.add_callback(self._on_done(meter, status, pending))
        return status

    def _on_done(self, meter: Any, status: Status, pending: list[int]) -> Any:
        def done(sync: Any) -> None:
            if not sync.success:
                logger.warning("%s: periodic NTP sync failed: %s", check.label(meter),
                               exception_of(sync))
            with self._lock:
                self.failed[meter.name] += 0 if sync.success else 1
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                status.set_finished()
        return done

    def __repr__(self) -> str:
        return f"PeriodicSync({', '.join(meter.name for meter in self.meters)})"
