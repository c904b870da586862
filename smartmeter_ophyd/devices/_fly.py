"""Fly-scan settings and the progress-reporting status of a SmartMeter flyer.

* :class:`FlyConfig` - what one fly scan samples (rate, measures, transport, flow control,
  length, scheduled start, time slot, who releases a paused start).  :meth:`FlyConfig.from_value` accepts a ``FlyConfig`` or a mapping
  (what ``bps.prepare(meter, {...})`` passes) and validates everything with the codec's
  ``Sample`` command **before** anything is sent to the meter.
* :class:`ProgressStatus` - an ophyd ``DeviceStatus`` whose watchers receive ``current``,
  ``initial``, ``target`` and ``unit`` (bluesky's ``ProgressBarManager`` then draws a real bar;
  plain ``DeviceStatus`` only reports the name).

Limits: ``duration_s`` is converted to a sample count with the nominal rate (bursty rates
deliver ``rate`` samples per second too, §4.3); a fly with neither ``duration_s`` nor
``n_samples`` runs until ``stop()`` and its progress has no target.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from ophyd.status import DeviceStatus

from ..client import MeterCommandError, SampleConfig
from ..protocol import CommandError, Measures, Sample, Transport, max_request_samples

FLOW_CONTROL_MODES: Final = ("none", "cts", "reqSamples")
RELEASE_MODES: Final = ("meter", "plan")

_PLACEHOLDER_UDP_PORT: Final = 1
"""Validation only: the client binds the real UDP port at kickoff."""


def coerce_measures(value: Any) -> Measures:
    """A ``Measures`` from a member, its name (``"VI"``), a firmware input string
    (``"v,i_L1"``, ``"p,q"``) or the string the meter reports (``"p,p,p,q,q,q"``).

    Only the name is checked here; whether the rate suits the measures is the ``Sample``
    command's check (§4.3, §4.11), done by :meth:`FlyConfig.from_value`.
    """
    if isinstance(value, Measures):
        return value
    if isinstance(value, str):
        if value.upper() in Measures.__members__:
            return Measures[value.upper()]
        for member in Measures:
            if value == member.reported or value in member.spec.accepted_inputs:
                return member
    return Sample(measures=value).measures  # raises CommandError naming the allowed values


def coerce_transport(value: Any) -> Transport:
    if isinstance(value, Transport):
        return value
    if isinstance(value, str):
        for member in Transport:
            if value.upper() in (member.name, member.value.upper()):
                return member
    return Sample(transport=value).transport  # raises CommandError


@dataclass(frozen=True, slots=True)
class FlyConfig:
    """Settings of one fly scan of one meter (§4.1).

    ``flow_control``:

    * ``"none"``: the meter streams freely;
    * ``"cts"``: the meter starts paused (``flowCtr``, §5.1); the device resumes it (at
      ``kickoff``, or when the plan releases it with ``release="plan"``) and then pauses and
      resumes it to bound the host-side backlog without letting the meter's ring buffer near
      overflow (:class:`~._flow.CtsPolicy`);
    * ``"reqSamples"``: the meter starts paused and the host pulls: ``reqSamples`` of
      ``request_size`` samples (11..42 for 24-byte measures, 11..128 for 8-byte: the 1029-byte
      send buffer, §5.2), each followed by ``cts false`` because ``reqSamples`` switches
      continuous sending on (§5.2); whatever arrives in between is recorded.

    ``duration_s`` or ``n_samples`` (not both) bounds the fly: when the target is reached the
    device sends ``stop``; the meter's tail (§4.8) may add samples and they are all recorded.
    ``start_time`` (integer unix seconds, 0.5..20 s ahead, §6.4) schedules the start on the
    meter's clock; ``prepare`` then arms the meter.  ``release="plan"`` (with ``"cts"``) arms a
    paused meter in ``prepare`` and releases it in ``kickoff``, so a plan can release several
    meters together.  ``slot=(slot, slots)`` makes the meter send only in the seconds where
    ``second % slots == slot`` (§5.3).

    ``transport="MQTT"`` (§4.14): the meter publishes one JSON message per sample to its
    broker; the :class:`~smartmeter_ophyd.devices.SmartMeter` receives them through the MQTT
    client (its ``mqtt_broker``).  Low rates only (the client's limit), started now (no
    ``start_time``), no ``slot`` and no ``reqSamples``.
    """

    rate: int = 8000
    measures: Measures | str = Measures.VI
    transport: Transport | str = Transport.TCP
    flow_control: str = "none"
    duration_s: float | None = None
    n_samples: int | None = None
    start_time: int | None = None
    prefix: bool = True
    slot: tuple[int, int] | None = None
    release: str = "meter"
    request_size: int | None = None
    finish_first: bool = False
    """Host side only: when meters end together, this one's file is finished (written,
    timed and closed on the I/O thread) before those of the meters still waiting.  The
    plans set it on the alignment's reference, whose file every other meter's alignment
    waits for."""

    @property
    def arms_in_prepare(self) -> bool:
        """Whether ``prepare`` sends ``sample`` (a scheduled start or a plan-released one)."""
        return self.start_time is not None or self.release == "plan"

    @property
    def starts_paused(self) -> bool:
        """The meter holds its samples until the host says so (§5.1, §5.2, §5.3)."""
        return self.flow_control in ("cts", "reqSamples") or self.slot is not None

    @property
    def target_samples(self) -> int | None:
        """Samples after which the device stops the meter (None: until ``stop()``)."""
        if self.n_samples is not None:
            return self.n_samples
        if self.duration_s is not None:
            return max(1, math.ceil(self.duration_s * self.rate))
        return None

    def sample_config(self) -> SampleConfig:
        return SampleConfig(
            transport=self.transport,
            rate=self.rate,
            measures=self.measures,
            prefix=self.prefix,
            flow_control=self.flow_control in ("cts", "reqSamples"),
            slot=self.slot,
            start_time=self.start_time,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for documents and logs)."""
        measures = self.measures.reported if isinstance(self.measures, Measures) else self.measures
        transport = self.transport.value if isinstance(self.transport, Transport) else self.transport
        return {
            "rate": self.rate,
            "measures": measures,
            "transport": transport,
            "flow_control": self.flow_control,
            "duration_s": self.duration_s,
            "n_samples": self.n_samples,
            "start_time": self.start_time,
            "prefix": self.prefix,
            "slot": list(self.slot) if self.slot is not None else None,
            "release": self.release,
            "request_size": self.request_size,
        }

    @classmethod
    def from_value(cls, value: FlyConfig | Mapping[str, Any], meter: str) -> FlyConfig:
        """Validate ``value``; errors are :class:`MeterCommandError` naming ``meter``."""
        if isinstance(value, FlyConfig):
            settings = {f.name: getattr(value, f.name) for f in fields(cls)}
        elif isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise MeterCommandError(
                    meter, f"prepare: unknown settings {unknown}; allowed: {sorted(known)}"
                )
            settings = dict(value)
        else:
            raise MeterCommandError(
                meter,
                f"prepare: expected a FlyConfig or a mapping, not {type(value).__name__}",
            )
        try:
            config = cls(**settings)
            return config._validated()
        except CommandError as exc:
            raise MeterCommandError(meter, f"prepare: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise MeterCommandError(meter, f"prepare: {exc}") from exc

    def _validated(self) -> FlyConfig:
        measures = coerce_measures(self.measures)
        transport = coerce_transport(self.transport)
        if self.flow_control not in FLOW_CONTROL_MODES:
            raise ValueError(
                f"flow_control={self.flow_control!r} is not allowed; allowed: {FLOW_CONTROL_MODES}"
            )
        if self.duration_s is not None and self.n_samples is not None:
            raise ValueError("give duration_s or n_samples, not both")
        if not isinstance(self.finish_first, bool):
            raise ValueError(f"finish_first={self.finish_first!r} must be True or False")
        if self.duration_s is not None and (
            isinstance(self.duration_s, bool)
            or not isinstance(self.duration_s, int | float)
            or not math.isfinite(self.duration_s)
            or self.duration_s <= 0
        ):
            raise ValueError(f"duration_s={self.duration_s!r} must be a positive number of seconds")
        if self.n_samples is not None and (
            isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples <= 0
        ):
            raise ValueError(f"n_samples={self.n_samples!r} must be a positive integer")
        if self.release not in RELEASE_MODES:
            raise ValueError(f"release={self.release!r} is not allowed; allowed: {RELEASE_MODES}")
        if self.release == "plan" and self.flow_control != "cts":
            raise ValueError(
                f"release='plan' needs flow_control='cts' (the meter waits paused until the "
                f"plan sends cts, §5.1), not flow_control={self.flow_control!r}"
            )
        if transport is Transport.MQTT:
            if self.start_time is not None:
                raise ValueError(
                    "transport MQTT cannot start at a start_time: the scheduled reply's message "
                    "exceeds PubSubClient's 256-byte packet and never arrives (§6.4, §8.3)"
                )
            if self.flow_control == "reqSamples":
                raise ValueError(
                    "transport MQTT cannot be pulled with flow_control='reqSamples': the "
                    "meter publishes every sample itself (§4.14); use 'none' or 'cts'"
                )
        slot = None if self.slot is None else tuple(self.slot)
        if self.flow_control == "reqSamples":
            limit = max_request_samples(measures)
            size = self.request_size
            if isinstance(size, bool) or not isinstance(size, int) or not 11 <= size <= limit:
                raise ValueError(
                    f"request_size={size!r} is not allowed for flow_control='reqSamples' with "
                    f"{measures.name}; allowed: 11..{limit} samples (the 1029-byte send "
                    "buffer, §5.2)"
                )
            if measures.latched:
                raise ValueError(
                    f"flow_control='reqSamples' does not work with latched measures "
                    f"{measures.name} (§5.2)"
                )
        elif self.request_size is not None:
            raise ValueError("request_size is only used with flow_control='reqSamples'")
        # The codec's own checks: rate vs measures (§4.3), booleans, slots, start time (§6.4).
        Sample(
            transport=transport,
            rate=self.rate,
            measures=measures,
            prefix=self.prefix,
            port=_PLACEHOLDER_UDP_PORT if transport is Transport.UDP else None,
            flow_control=self.flow_control in ("cts", "reqSamples"),
            slot=slot,  # type: ignore[arg-type]
            start_time=self.start_time,
        )
        return replace(self, measures=measures, transport=transport, slot=slot)


class ProgressStatus(DeviceStatus):
    """A ``DeviceStatus`` that tells its watchers how many samples are done out of how many.

    Watchers are called with ``name``, ``current``, ``initial`` (0), ``target`` (when known),
    ``unit`` ("samples") and ``time_elapsed``, as ``bluesky.utils.ProgressBar`` expects.
    """

    def __init__(self, device: Any, *, target: int | None, **kwargs: Any) -> None:
        self._progress_lock = threading.Lock()
        self._current = 0
        self._target = target
        self._started = time.monotonic()
        super().__init__(device, **kwargs)

    @property
    def current(self) -> int:
        return self._current

    @property
    def target(self) -> int | None:
        return self._target

    def _payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "name": self.device.name,
            "current": self._current,
            "initial": 0,
            "unit": "samples",
            "time_elapsed": time.monotonic() - self._started,
        }
        if self._target is not None:
            payload["target"] = self._target
        return payload

    def report(self, current: int) -> None:
        """Tell the watchers that ``current`` samples are done."""
        with self._progress_lock:
            self._current = int(current)
            watchers = list(self._watchers)
            payload = self._payload()
        for watcher in watchers:
            watcher(**payload)

    def watch(self, func: Callable[..., None]) -> None:
        with self._progress_lock:
            self._watchers.append(func)
            payload = self._payload()
        func(**payload)

    def _settled(self) -> None:
        # ophyd's default sends only fraction=0.0, which a progress bar shows as "no progress".
        payload = self._payload()
        for watcher in list(self._watchers):
            watcher(**payload)
