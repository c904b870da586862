"""``rerun``: repeat a recorded run with the same plan, arguments and meter settings.

The run's start document says which plan ran (``plan_name``) with which arguments
(``plan_args``, meters by name); each meter's stream descriptor holds the meter's
configuration when the run started.  :func:`rerun` reads both from the catalog, restores
every stored setting that differs (:func:`~plans.stubs.restore_settings`: time server, log
level, MQTT and stream servers, calibration, daily restart; the sampling settings are plan
arguments), then runs the same plan.  The new start document carries ``rerun_of`` (the
original uid) and ``restored_settings``.

Everything is checked before the first message: the run exists, its plan can be repeated,
the meters given are exactly the meters recorded (by name), and the repeated plan's own
argument checks pass.  Plans that can be repeated: ``synchronized_fly``, ``slotted_fly``,
``fly_meters``, ``monitor``.

Limits: a ``host_clock`` is recorded by name only; give the object again
(``host_clock=HostClock(...)``).  Meter settings that the run did not record (an old run, a
meter whose stream was never described) are not restored, and the start document says so.
"""

import logging
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import bluesky.preprocessors as bpp
from bluesky.utils import Msg

from smartmeter_ophyd.devices import HostClock, SmartMeter

from . import _validate as check
from . import stubs
from ._errors import PlanArgumentError
from ._fly import fly_meters, slotted_fly, synchronized_fly
from ._monitor import monitor

logger = logging.getLogger(__name__)

REPEATABLE = {
    "synchronized_fly": synchronized_fly,
    "slotted_fly": slotted_fly,
    "fly_meters": fly_meters,
    "monitor": monitor,
}
RESTORED_SETTINGS = ("time_server", "log_level", "mqtt_server", "stream_server", "calibration",
                     "daily_restart")
"""Stored meter settings a rerun restores (the sampling settings are plan arguments)."""


def _open(catalog: Any) -> Any:
    if catalog is None or isinstance(catalog, str):
        from smartmeter_ophyd.quiet import quiet_tiled
        from smartmeter_ophyd.storage import DEFAULT_PROFILE, open_catalog

        quiet_tiled()
        return open_catalog(catalog or DEFAULT_PROFILE)
    return catalog


def _find(client: Any, uid: str) -> Any:
    if not isinstance(uid, str) or len(uid) < 4:
        raise PlanArgumentError(f"rerun: uid={uid!r}: give a run uid (or at least 4 characters)")
    if uid in client:
        return client[uid]
    matches = [key for key in client.keys() if str(key).startswith(uid)]
    if len(matches) != 1:
        problem = "no run" if not matches else f"{len(matches)} runs"
        raise PlanArgumentError(f"rerun: {problem} with a uid starting {uid!r} in the catalog")
    return client[matches[0]]


def recorded_settings(run: Any, meter: str) -> dict[str, Any] | None:
    """``{setting: value}`` of ``meter`` as recorded at the start of ``run`` (None: unknown)."""
    for stream in (meter, "primary"):
        if stream not in run:
            continue
        configuration = (run[stream].metadata.get("configuration") or {}).get(meter)
        if not configuration:
            continue
        data = configuration.get("data") or {}
        values = {s: data[f"{meter}_{s}"] for s in RESTORED_SETTINGS if f"{meter}_{s}" in data}
        if values:
            return {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in values.items()}
    return None


def _arguments(start: Mapping[str, Any], meters: Sequence[Any], host_clock: Any
               ) -> dict[str, Any]:
    plan = start.get("plan_name")
    args = dict(start.get("plan_args") or {})
    names = list(args.pop("meters", start.get("detectors", [])))
    given = [m.name for m in meters]
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        raise PlanArgumentError(
            f"rerun: run {start['uid'][:8]} recorded meters {names}; "
            + (f"missing: {missing}; " if missing else "")
            + (f"not in the run: {extra}; " if extra else "")
            + "give a SmartMeter with each recorded name"
        )
    by_name = {m.name: m for m in meters}
    args["meters"] = [by_name[n] for n in names]
    if "host_clock" in args:
        if args["host_clock"] is not None and host_clock is None:
            raise PlanArgumentError(
                f"rerun: run {start['uid'][:8]} measured the host clock with "
                f"{args['host_clock']!r}; give host_clock=HostClock(...) again")
        args["host_clock"] = host_clock
    if plan == "fly_meters":
        fly = ((start.get("meters") or {}).get(names[0]) or {}).get("fly")
        args["config"] = {k: v for k, v in (fly or {}).items() if k != "start_time"} or None
    return args


def _continue(first: Msg, gen: Generator[Msg, Any, Any]) -> Generator[Msg, Any, Any]:
    """Yield ``first`` (already taken from ``gen``), then delegate to ``gen`` entirely."""
    msg = first
    while True:
        try:
            reply = yield msg
        except GeneratorExit:
            gen.close()
            raise
        except BaseException as exc:  # the RunEngine throws into the plan: pass it on
            try:
                msg = gen.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            msg = gen.send(reply)
        except StopIteration as stop:
            return stop.value


def rerun(
    uid: str,
    meters: Sequence[SmartMeter],
    *,
    catalog: Any = None,
    host_clock: HostClock | None = None,
    md: dict[str, Any] | None = None,
) -> Generator[Msg, Any, str]:
    """Repeat run ``uid`` on ``meters`` (one SmartMeter per recorded meter name).

    Parameters
    ----------
    uid : str
        The run to repeat (its uid, or a unique prefix of at least 4 characters).
    meters : list of SmartMeter
        The meters, named as in the original run.
    catalog : tiled client, profile name or None
        Where the original run is; None opens the Tiled profile ``smartmeter``.
    host_clock : HostClock or None
        Needed again when the original run measured the host clock.
    md : dict, optional
        More metadata for the new start document.

    Returns the new run's uid.
    """
    meters = check.meter_list(meters, "rerun", parts=("name", *RESTORED_SETTINGS))
    extra_md = check.metadata(md, "rerun")
    run = _find(_open(catalog), uid)
    start = run.start
    plan_name = start.get("plan_name")
    plan = REPEATABLE.get(str(plan_name))
    if plan is None:
        raise PlanArgumentError(
            f"rerun: run {start['uid'][:8]} ran {plan_name!r}, which rerun cannot repeat; "
            f"repeatable: {sorted(REPEATABLE)}")
    args = _arguments(start, meters, host_clock)
    snapshot = {m.name: recorded_settings(run, m.name) for m in meters}
    unknown = sorted(name for name, values in snapshot.items() if values is None)
    if unknown:
        logger.warning("rerun: run %s did not record the settings of %s; they stay as they are",
                       start["uid"][:8], unknown)
    restore = {name: values for name, values in snapshot.items() if values}
    run_md = {"rerun_of": start["uid"], "restored_settings": restore,
              "settings_not_recorded": unknown, **extra_md}
    inner = plan(**args, md=run_md)
    first = next(inner)  # the repeated plan's own checks, before any message is sent
    to_restore = [m for m in meters if m.name in restore]
    if to_restore:
        # staged (connected) for the writes only; the repeated plan stages them again
        written = yield from bpp.stage_wrapper(stubs.restore_settings(to_restore, restore),
                                               to_restore)
        logger.info("rerun: restored %s", {k: v for k, v in written.items() if v})
    return (yield from _continue(first, inner))
