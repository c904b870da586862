"""Argument checks shared by the plans: run before any message is yielded.

Each plan calls these at the top of its generator body, so a bad argument raises
:class:`~plans.PlanArgumentError` on the first ``next()`` with zero messages yielded - no
meter is touched.  Messages name the plan, the argument, the meter when the problem is
specific to one, and the allowed values.

Per-meter arguments (``rate``, ``measures``) take one value for every meter or a mapping
from meter name to value that names every meter exactly once.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from smartmeter_ophyd.client import MeterCommandError
from smartmeter_ophyd.devices import FlyConfig
from smartmeter_ophyd.protocol import Measures, Transport, max_request_samples

from ._errors import PlanArgumentError

_T = TypeVar("_T")

FLY_METER_PARTS = ("ntp", "prepare", "kickoff", "complete", "collect_asset_docs", "gap_stream",
                   "timing_stream", "run_summary", "stage", "unstage")
"""What a meter must offer to be flown by the plans (the SmartMeter device API)."""
READ_METER_PARTS = ("trigger", "read", "voltage", "current", "active_power", "energy", "frequency",
                    "stage", "unstage")
"""What :func:`~plans.monitor` reads: a SmartMeter's readings (§3.10)."""
PLAN_TRANSPORTS = ("TCP", "UDP")
"""Sinks the plans record from (Serial, MQTT and FFMPEG do not reach the HDF5 writer)."""
FLOW_CONTROL_CHOICES = (None, "cts", "reqSamples")


def label(meter: Any) -> str:
    """How messages name a meter: its ``meter_label`` if it has one, else its name."""
    return str(getattr(meter, "meter_label", None) or getattr(meter, "name", repr(meter)))


def meter_list(meters: Any, plan: str, parts: Sequence[str] = FLY_METER_PARTS) -> tuple[Any, ...]:
    """A non-empty sequence of distinct meters, each offering ``parts``."""
    if isinstance(meters, str | bytes) or not isinstance(meters, Sequence):
        raise PlanArgumentError(
            f"{plan}: meters must be a list of SmartMeter devices, not {type(meters).__name__}"
        )
    if not meters:
        raise PlanArgumentError(f"{plan}: meters is empty; give at least one SmartMeter")
    seen: dict[str, Any] = {}
    for meter in meters:
        name = getattr(meter, "name", None)
        if not isinstance(name, str) or not name:
            raise PlanArgumentError(f"{plan}: {meter!r} is not a named device (no .name)")
        missing = [part for part in parts if not hasattr(meter, part)]
        if missing:
            raise PlanArgumentError(
                f"{plan}: {label(meter)} is not a SmartMeter: it has no {', '.join(missing)}"
            )
        if name in seen:
            problem = "twice" if seen[name] is meter else "for two different devices"
            raise PlanArgumentError(f"{plan}: meter name {name!r} is given {problem}")
        seen[name] = meter
    return tuple(meters)


def number(
    value: Any,
    what: str,
    plan: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """A finite real number within the bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanArgumentError(f"{plan}: {what}={value!r} must be a finite number")
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    too_high = maximum is not None and value > maximum
    if too_low or too_high:
        bounds = []
        if minimum is not None:
            bounds.append(f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        raise PlanArgumentError(
            f"{plan}: {what}={value!r} is out of range; allowed: {' and '.join(bounds)}"
        )
    return float(value)


def flag(value: Any, what: str, plan: str) -> bool:
    if not isinstance(value, bool):
        raise PlanArgumentError(f"{plan}: {what}={value!r} must be True or False")
    return value


def integer(value: Any, what: str, plan: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanArgumentError(f"{plan}: {what}={value!r} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f"..{maximum}" if maximum is not None else " or more"
        raise PlanArgumentError(
            f"{plan}: {what}={value!r} is out of range; allowed: {minimum}{upper}"
        )
    return value


def metadata(md: Any, plan: str) -> dict[str, Any]:
    if md is None:
        return {}
    if not isinstance(md, Mapping):
        raise PlanArgumentError(f"{plan}: md must be a dict or None, not {type(md).__name__}")
    return dict(md)


def per_meter(
    value: Any,
    meters: Sequence[Any],
    what: str,
    plan: str,
    check: Callable[[Any, Any], _T],
) -> dict[str, _T]:
    """``{meter name: check(value, meter)}`` from one value or a name-keyed mapping."""
    names = [m.name for m in meters]
    if isinstance(value, Mapping):
        keys = [getattr(k, "name", k) for k in value]
        unknown = sorted(str(k) for k in keys if k not in names)
        missing = [n for n in names if n not in keys]
        if unknown or missing:
            raise PlanArgumentError(
                f"{plan}: {what} as a mapping must name every meter once; "
                + (f"unknown: {unknown}; " if unknown else "")
                + (f"missing: {missing}; " if missing else "")
                + f"meters: {names}"
            )
        by_name = {getattr(k, "name", k): v for k, v in value.items()}
        return {m.name: check(by_name[m.name], m) for m in meters}
    return {m.name: check(value, m) for m in meters}


def measures_of(value: Any, meter: Any, plan: str) -> Measures:
    if isinstance(value, Measures):
        return value
    if isinstance(value, str):
        for mode in Measures:
            if value in mode.spec.accepted_inputs or value.upper() == mode.name:
                return mode
    allowed = sorted({text for mode in Measures for text in mode.spec.accepted_inputs})
    raise PlanArgumentError(f"{plan}: {label(meter)}: measures={value!r}; allowed: {allowed}")


def transport_of(value: Any, plan: str) -> str:
    if isinstance(value, Transport):
        value = value.value
    if isinstance(value, str) and value.upper() in PLAN_TRANSPORTS:
        return value.upper()
    raise PlanArgumentError(f"{plan}: transport={value!r}; allowed: {list(PLAN_TRANSPORTS)}")


def flow_control_of(value: Any, plan: str) -> str:
    """The device's ``flow_control`` string for the plan's ``None | "cts" | "reqSamples"``."""
    if value is None or value == "none":
        return "none"
    if value in ("cts", "reqSamples"):
        return str(value)
    raise PlanArgumentError(
        f"{plan}: flow_control={value!r}; allowed: None (free streaming), 'cts', 'reqSamples'"
    )


def request_size_of(value: Any, flow_control: str, measures: Measures, meter: Any,
                    plan: str) -> int | None:
    """reqSamples' N: at most what fits the send buffer (§5.2); None unless reqSamples."""
    if flow_control != "reqSamples":
        if value is not None:
            raise PlanArgumentError(
                f"{plan}: request_size={value!r} is only used with flow_control='reqSamples'"
            )
        return None
    limit = max_request_samples(measures)
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, int) or not 11 <= value <= limit:
        raise PlanArgumentError(
            f"{plan}: {label(meter)}: request_size={value!r} with measures "
            f"{measures.reported!r}; allowed: 11..{limit} samples (the 1029-byte send buffer, "
            "§5.2)"
        )
    return value


def fly_config(meter: Any, plan: str, **settings: Any) -> FlyConfig:
    """The device's own validation of one meter's settings, as a plan argument error."""
    try:
        return FlyConfig.from_value(settings, label(meter))
    except MeterCommandError as exc:
        raise PlanArgumentError(f"{plan}: {exc}") from exc
