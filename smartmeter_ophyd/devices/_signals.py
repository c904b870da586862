"""The signals of a SmartMeter device: readings, settings sent to the meter, local settings.

* :class:`MeterReadback` - a value the device updates from the meter; users cannot write it.
* :class:`LineValue` / :class:`LineReadings` / :class:`HintedLineReadings` - per-line (L1, L2,
  L3) readings as scalar signals with units.
* :class:`MeterSetting` - ``set``/``put`` validates with the codec, sends the command on the
  client's loop and waits for the meter's reply.
* :class:`LocalSamplingSetting` - a sampling setting kept on the host until ``prepare``.

The validators at the end turn what users type into what the codec accepts, raising the
codec's ``CommandError`` (named by the signal) before anything is sent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus, Status
from ophyd.utils.errors import ReadOnlyError

from ..client import AsyncMeterClient, MeterCommandError
from ..protocol import CommandError, SetCalibration, SetDailyRestart, SetLogLevel
from ._fly import FLOW_CONTROL_MODES
from ._status import status_from_coroutine

if TYPE_CHECKING:
    from ._smartmeter import SmartMeter


class MeterReadback(Signal):
    """A value the device updates from the meter; users cannot write it."""

    def put(self, value: Any, **kwargs: Any) -> None:
        raise ReadOnlyError(f"{self.name} is read from the meter and cannot be written")

    def set(self, value: Any, **kwargs: Any) -> Status:
        raise ReadOnlyError(f"{self.name} is read from the meter and cannot be written")

    def _update(self, value: Any, timestamp: float | None = None) -> None:
        super().put(value, timestamp=timestamp if timestamp is not None else time.time())


class LineValue(MeterReadback):
    """One line's value of a reading: a float, described with the units of its parent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, value=math.nan, **kwargs)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        units = getattr(self.parent, "units", "")
        desc[self.name].update({"dtype": "number", "shape": [], "dtype_numpy": "<f8",
                                "units": units})
        return desc


class LineReadings(Device):
    """A per-line (L1, L2, L3) reading as three scalar signals.

    Scalars, not a 3-element array: TiledWriter stores arrays of <= 16 elements in its
    table as their text repr, while scalar fields become real float columns.  The lines are
    ``normal``; :class:`HintedLineReadings` hints them (the line voltages).
    """

    l1 = Cpt(LineValue, kind=Kind.normal)
    l2 = Cpt(LineValue, kind=Kind.normal)
    l3 = Cpt(LineValue, kind=Kind.normal)

    def __init__(self, *args: Any, units: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = units

    def _update(self, values: Sequence[float], timestamp: float | None = None) -> None:
        now = timestamp if timestamp is not None else time.time()
        for signal, value in zip((self.l1, self.l2, self.l3), values, strict=True):
            signal._update(float(value), now)


class HintedLineReadings(LineReadings):
    """Per-line readings a person wants to see live (tables and plots of ``BestEffortCallback``)."""

    l1 = Cpt(LineValue, kind=Kind.hinted)
    l2 = Cpt(LineValue, kind=Kind.hinted)
    l3 = Cpt(LineValue, kind=Kind.hinted)


class MeterSetting(Signal):
    """A meter setting: ``set``/``put`` validates, sends the command, waits for the reply.

    ``command(async_client, value)`` returns the request's coroutine (run on the client's
    loop); ``validate(value)`` returns the value to store (raises ``CommandError``/
    ``ValueError`` before anything is sent).
    """

    def __init__(
        self,
        *args: Any,
        validate: Callable[[Any], Any],
        command: Callable[[AsyncMeterClient, Any], Coroutine[Any, Any, Any]],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._validate = validate
        self._command = command

    @property
    def meter(self) -> SmartMeter:
        return self.parent  # type: ignore[no-any-return]  # a SmartMeter component

    def _checked(self, value: Any) -> Any:
        try:
            return self._validate(value)
        except (CommandError, ValueError, TypeError) as exc:
            raise MeterCommandError(self.meter.meter_label, f"{self.attr_name}: {exc}") from exc

    def set(self, value: Any, **kwargs: Any) -> DeviceStatus:  # type: ignore[override]
        checked = self._checked(value)
        client = self.meter.client

        async def run() -> None:
            await self._command(client.async_client, checked)
            super(MeterSetting, self).put(checked)

        return status_from_coroutine(self.meter, client, run())

    def put(self, value: Any, **kwargs: Any) -> None:
        checked = self._checked(value)
        client = self.meter.client
        client.run(self._command(client.async_client, checked), f"{self.attr_name} put")
        super().put(checked)

    def _update(self, value: Any) -> None:
        super().put(value)


class LocalSamplingSetting(Signal):
    """A sampling setting kept on the host until ``prepare``/``kickoff`` (validated on put)."""

    def __init__(self, *args: Any, validate: Callable[[Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._validate = validate

    def put(self, value: Any, **kwargs: Any) -> None:
        label = getattr(self.parent, "meter_label", self.name)
        try:
            value = self._validate(value)
        except (CommandError, ValueError, TypeError) as exc:
            raise MeterCommandError(label, f"{self.attr_name}: {exc}") from exc
        super().put(value, **kwargs)


def checked_text(command: type[Any]) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        command(value)
        return value

    return validate


def checked_calibration(value: Any) -> list[float]:
    factors = tuple(float(v) for v in value)
    SetCalibration(factors)
    return list(factors)


def checked_daily_restart(value: Any) -> list[int]:
    hour, minute = (int(v) for v in value)
    SetDailyRestart(hour, minute)
    return [hour, minute]


def checked_log_level(value: Any) -> str:
    return str(SetLogLevel(value).level.name)


def checked_rate(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"rate={value!r} must be a positive integer (Hz)")
    return value


def checked_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} must be True or False")
    return value


def checked_flow(value: Any) -> str:
    if value not in FLOW_CONTROL_MODES:
        raise ValueError(f"flow_control={value!r}; allowed: {', '.join(FLOW_CONTROL_MODES)}")
    return str(value)
