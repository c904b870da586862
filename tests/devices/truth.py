"""Ground truth for stored time axes: where the meter's clock stood at each true instant.

A stored axis claims the meter's clock (NTP time as the meter knows it, §6.1), so it is
checked twice: against the meter's clock at each sample's true instant, which isolates the
package's time model, and against true time, which adds how far the meter's last sync left
its clock (less than half the round trip, i.e. below the logged confidence + 1 ms, §6.2).
"""

from __future__ import annotations

import numpy as np

from smartmeter_ophyd.emulator import EmulatorFleet


def meter_clock_and_truth(
    fleet: EmulatorFleet, i: int, n: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(meter clock, true instant) of meter ``i``'s first ``n`` delivered rows, and the
    bound (s) on its clock's error over the session: its last sync's confidence + 1 ms.

    Valid for sessions with no sync inside them (the clock is then one straight line)."""
    session = fleet.session_truth(i)
    syncs = fleet.ntp_history(i)
    assert syncs, f"meter {i} never synced"
    assert all(sync.true_time < session.true_start for sync in syncs), "a sync inside the session"
    true_times = session.true_times[:n]
    meter_clock = (true_times + session.clock_offset_s
                   + (true_times - session.true_start) * session.drift_ppm * 1e-6)
    return meter_clock, true_times, (syncs[-1].confidence_ms + 1) * 1e-3
