"""Every plan checks all its arguments on its first ``next()``, before any message.

The meters are real :class:`SmartMeter` devices that were never connected: a plan that
touched one before raising would need a connection it does not have.  ``pytest.raises``
around the first ``next()`` proves zero messages were yielded.  Messages must name the
plan, the meter where it matters, and the allowed values.
"""

from __future__ import annotations

import math

import pytest

import plans
from plans import PlanArgumentError, SlotPlanError, monitor, slotted_fly, stubs, synchronized_fly
from smartmeter_ophyd.devices import FlyConfig, HostClock, SmartMeter


@pytest.fixture
def meters(tmp_path):
    made = [SmartMeter("127.0.0.1", 9, name=f"m{i}", data_directory=tmp_path / "hdf5")
            for i in (1, 2)]
    yield made
    for meter in made:
        meter.destroy()


def first_message(plan):
    return next(plan)


BAD_FLY_ARGUMENTS = [
    ({"duration": 0}, r"duration=0 is out of range; allowed: > 0"),
    ({"duration": math.nan}, r"duration=nan must be a finite number"),
    ({"duration": "5"}, r"duration='5' must be a finite number"),
    ({"rate": 7}, r"m1.*rate 7 Hz does not divide 32000; allowed: 1, 2, 4"),
    ({"rate": {"m1": 8000}}, r"rate as a mapping must name every meter once; missing: \['m2'\]"),
    ({"rate": {"m1": 8000, "m2": 8000, "m3": 10}}, r"unknown: \['m3'\]"),
    ({"measures": "v,i,v"}, r"m1.*measures='v,i,v'; allowed: \['p,q', 'v,i'"),
    ({"measures": {"m1": "v,i", "m2": "p,q"}, "rate": 50},
     r"m2.*'p,q' is latched; a scheduled start samples the raw waveform.*§6\.4"),
    ({"transport": "Serial"}, r"transport='Serial'; allowed: \['TCP', 'UDP'\]"),
    ({"start_in": 0.3}, r"start_in=0.3 is out of range; allowed: > 0.5 and <= 20"),
    ({"start_in": 25}, r"start_in=25 is out of range"),
    ({"ntp_confidence_ms": 0}, r"ntp_confidence_ms=0 is out of range; allowed: > 0 and <= 200"),
    ({"ntp_attempts": 0}, r"ntp_attempts=0 is out of range; allowed: 1\.\.100"),
    ({"ntp_attempts": 2.5}, r"ntp_attempts=2.5 must be an integer"),
    ({"ntp_period": 0.5}, r"ntp_period=0.5 is out of range; allowed: >= 1"),
    ({"flow_control": "xon"},
     r"flow_control='xon'; allowed: None \(free streaming\), 'cts', 'reqSamples'"),
    ({"flow_control": "reqSamples", "request_size": 43},
     r"m1.*request_size=43 .*allowed: 11\.\.42 samples"),
    ({"flow_control": "reqSamples", "request_size": 129, "measures": "v,i_L2"},
     r"request_size=129 .*allowed: 11\.\.128"),
    ({"request_size": 20}, r"request_size=20 is only used with flow_control='reqSamples'"),
    ({"host_clock": "pool.ntp.org"}, r"host_clock='pool.ntp.org' is not a HostClock"),
    ({"flush_period": 0}, r"flush_period=0 is out of range"),
    ({"md": "run 1"}, r"md must be a dict or None, not str"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_FLY_ARGUMENTS)
def test_synchronized_fly_refuses_bad_arguments_with_zero_messages(meters, kwargs, message):
    args = {"duration": 1.0, **kwargs}
    with pytest.raises(PlanArgumentError, match=message) as info:
        first_message(synchronized_fly(meters, **args))
    assert str(info.value).startswith("synchronized_fly: ")


@pytest.mark.parametrize("bad", [[], "m1", None])
def test_meters_must_be_a_non_empty_list(bad) -> None:
    with pytest.raises(PlanArgumentError, match=r"synchronized_fly: meters"):
        first_message(synchronized_fly(bad, 1.0))


def test_meters_must_be_distinct_smartmeters(meters, tmp_path) -> None:
    with pytest.raises(PlanArgumentError, match=r"meter name 'm1' is given twice"):
        first_message(synchronized_fly([meters[0], meters[0]], 1.0))
    other = SmartMeter("127.0.0.1", 10, name="m1", data_directory=tmp_path)
    with pytest.raises(PlanArgumentError, match=r"'m1' is given for two different devices"):
        first_message(synchronized_fly([meters[0], other], 1.0))
    clock = HostClock("127.0.0.1", 123)
    with pytest.raises(PlanArgumentError, match=r"host_clock is not a SmartMeter: it has no ntp"):
        first_message(synchronized_fly([meters[0], clock], 1.0))
    other.destroy()


def test_valid_arguments_reach_the_first_message_without_touching_a_meter(meters) -> None:
    plan = synchronized_fly(meters, 1.0, rate={"m1": 8000, "m2": 1000}, measures="v,i",
                            flow_control="reqSamples", host_clock=HostClock("127.0.0.1", 123))
    msg = first_message(plan)
    assert msg.command == "stage" and msg.obj is meters[0]
    assert not meters[0].connected and not meters[1].connected
    plan.close()
    # latched measures are fine for an immediate start (no §6.4 scheduling)
    immediate = synchronized_fly(meters, 1.0, rate=50, measures="p,q", start_in=0)
    assert first_message(immediate).command == "stage"
    immediate.close()


def test_slotted_fly_refuses_an_overflowing_plan_with_zero_messages(meters) -> None:
    with pytest.raises(SlotPlanError, match=r"ring buffer \(§4\.10: overflow reboots\)"):
        first_message(slotted_fly(meters, 1.0, rate=32000, slots=2, meter_mbps=1000,
                                  link_mbps=1000, buffer_fraction=0.4))
    with pytest.raises(SlotPlanError, match=r"more than the link"):
        first_message(slotted_fly(meters, 1.0, rate=32000, link_mbps=1.0))
    with pytest.raises(PlanArgumentError, match=r"slots=3 is out of range; allowed: 1\.\.2"):
        first_message(slotted_fly(meters, 1.0, slots=3))
    with pytest.raises(PlanArgumentError, match=r"m1.*rate 7 Hz does not divide 32000"):
        first_message(slotted_fly(meters, 1.0, rate=7))


def test_monitor_refuses_bad_arguments_with_zero_messages(meters) -> None:
    with pytest.raises(PlanArgumentError, match=r"monitor: period=0.1 .* allowed: >= 0.5"):
        first_message(monitor(meters, 0.1, 10))
    with pytest.raises(PlanArgumentError, match=r"monitor: duration=0 is out of range"):
        first_message(monitor(meters, 1.0, 0))
    with pytest.raises(PlanArgumentError, match=r"monitor: .* is not a named device"):
        first_message(monitor([object()], 1.0, 10))
    with pytest.raises(PlanArgumentError, match=r"monitor: host_clock is not a SmartMeter"):
        first_message(monitor([HostClock("127.0.0.1", 123)], 1.0, 10))


def test_stubs_refuse_bad_arguments_with_zero_messages(meters) -> None:
    with pytest.raises(PlanArgumentError, match=r"ntp_gate: confidence_ms=-1"):
        first_message(stubs.ntp_gate(meters, -1))
    with pytest.raises(PlanArgumentError, match=r"ntp_gate: attempts=0"):
        first_message(stubs.ntp_gate(meters, 5.0, 0))
    with pytest.raises(PlanArgumentError, match=r"schedule_start: no FlyConfig for \['m2'\]"):
        first_message(stubs.schedule_start(meters, {"m1": FlyConfig()}))
    with pytest.raises(PlanArgumentError, match=r"schedule_start: start_in=30"):
        first_message(stubs.schedule_start(meters, {"m1": FlyConfig(), "m2": FlyConfig()},
                                           start_in=30))
    with pytest.raises(PlanArgumentError, match=r"restore_settings: the snapshot has no settings"):
        first_message(stubs.restore_settings(meters, {"m1": {}}))
    with pytest.raises(PlanArgumentError, match=r"m1.*unknown settings \['meter_name'\]"):
        first_message(stubs.restore_settings(meters, {"m1": {"meter_name": "x"}, "m2": {}}))
    with pytest.raises(PlanArgumentError, match=r"measure_host_offset: .* is not a HostClock"):
        first_message(stubs.measure_host_offset(meters[0]))


def test_plans_have_literal_defaults_and_keyword_only_md() -> None:
    """bluesky-queueserver reads the signatures: defaults must be plain literals."""
    import inspect
    import typing

    for plan in (plans.synchronized_fly, plans.slotted_fly, plans.monitor, plans.fly_meters):
        typing.get_type_hints(plan)  # every annotation resolves at runtime
        signature = inspect.signature(plan)
        assert signature.parameters["md"].kind is inspect.Parameter.KEYWORD_ONLY
        for parameter in signature.parameters.values():
            assert parameter.annotation is not inspect.Parameter.empty, parameter
            default = parameter.default
            if default is not inspect.Parameter.empty:
                assert default is None or isinstance(default, int | float | str | bool), parameter
        assert not isinstance(plan.__annotations__["md"], str)  # real annotations, not strings
