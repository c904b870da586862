"""``plans.rerun``: repeat a recorded run with the same plan, arguments and meter settings.

A synchronized fly of two emulated meters is recorded; then a meter's calibration and log
level are changed behind the catalog's back, and the run is repeated.  The new run must
name the original, carry the same plan and arguments, and the meters must again hold the
recorded settings - read from the emulated meters themselves, not from our records.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(embedded_catalog: Any, ntp_server: tuple[str, int]) -> Iterator[dict[str, Any]]:
    from plans import synchronized_fly
    from smartmeter_ophyd.devices import SmartMeter
    from smartmeter_ophyd.emulator import EmulatorFleet
    from tests.run_engines import RunEngine

    fleet = EmulatorFleet(2, name_prefix="rr", time_server=ntp_server[0],
                          ntp_port=ntp_server[1]).start()
    meters = [SmartMeter(host, port, name=name, timeout=3.0, emulated=True,
                         data_directory=embedded_catalog.data_directory)
              for name, (host, port) in zip(fleet.names, fleet.addresses, strict=True)]
    engine = RunEngine({})
    engine.subscribe(embedded_catalog.document_sink())  # the stop waits until it is closed
    try:
        meters[0].connect()
        meters[0].calibration.set([1.0, 1.1, 1.0, 1.0, 0.9, 1.0]).wait(10)
        (uid,) = engine(synchronized_fly(meters, 0.5, rate=4000, measures="v,i,v,i,v,i",
                                         ntp_attempts=2, md={"sample": "A"}))
        yield {"fleet": fleet, "meters": meters, "engine": engine, "uid": uid,
               "client": embedded_catalog.client}
    finally:
        for meter in meters:
            meter.destroy()
        fleet.close()


def test_rerun_repeats_plan_arguments_and_settings(setup: dict[str, Any]) -> None:
    from plans import rerun

    client, meters, engine = setup["client"], setup["meters"], setup["engine"]
    original = client[setup["uid"]]
    # the meter is changed after the run: a rerun must put the recorded settings back
    meters[0].calibration.set([1.0] * 6).wait(10)
    assert list(meters[0].client.get_info().calibration) == [1.0] * 6

    (new_uid,) = engine(rerun(setup["uid"][:8], list(reversed(meters)), catalog=client))
    new = client[new_uid]
    assert new.start["rerun_of"] == original.start["uid"]
    assert new.start["plan_name"] == original.start["plan_name"] == "synchronized_fly"
    assert new.start["plan_args"] == original.start["plan_args"]
    assert new.stop["exit_status"] == "success"
    # the meters hold the recorded settings again (asked from the emulated meters)
    assert list(meters[0].client.get_info().calibration) == [1.0, 1.1, 1.0, 1.0, 0.9, 1.0]
    for meter in meters:
        old_config = original[meter.name].metadata["configuration"][meter.name]["data"]
        new_config = new[meter.name].metadata["configuration"][meter.name]["data"]
        for setting in ("time_server", "mqtt_server", "stream_server", "calibration",
                        "daily_restart", "log_level", "sampling_rate", "measures", "transport"):
            key = f"{meter.name}_{setting}"
            assert new_config[key] == old_config[key], key
        assert new[meter.name][f"{meter.name}_v_l1"].shape[0] >= 2000


def test_rerun_checks_everything_before_the_first_message(setup: dict[str, Any]) -> None:
    from plans import PlanArgumentError, rerun

    client, meters = setup["client"], setup["meters"]
    with pytest.raises(PlanArgumentError, match="missing: \\['rr2'\\]"):
        next(rerun(setup["uid"], meters[:1], catalog=client))
    with pytest.raises(PlanArgumentError, match="no run"):
        next(rerun("ffffffff", meters, catalog=client))
