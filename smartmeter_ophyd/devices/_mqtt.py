"""A meter's MQTT status (protocol.md §8.2) as an ophyd device: :class:`MeterMqttStatus`.

The meter publishes, every ~5 s while idle, the summed power, energy, current and the mean
voltage.  Each arrival updates the device's signals at once (subscriptions and
``bp.monitor`` see every status); :meth:`MeterMqttStatus.trigger` waits for the *next*
status, so ``bp.count`` records fresh values.  The signals' timestamp is the meter's own
clock (whole seconds) when the meter has synced NTP, otherwise the host's receive time;
``time_source`` says which, ``meter_ts`` is the meter's value as sent (0 = not synced) and
``received_at`` the host's receive time, so host time is never passed off as the meter's.

Limits: no status comes while the meter samples (§8.3): a trigger then fails after
``status_timeout`` with an error naming the meter.  The values are rounded to 2 decimals by
the firmware; current includes the neutral conductor (§12 #10).  Needs the ``mqtt`` extra.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.signal import SignalRO
from ophyd.status import Status

from ..client import MeterStatus, MeterTimeoutError, MqttBroker

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 12.0
"""Default wait for a fresh status in ``trigger`` (the firmware sends one every ~5 s)."""


class StatusSignal(SignalRO):
    """A read-only signal the device updates from the broker thread, with ``units``."""

    def __init__(self, *, units: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def _update(self, value: Any, timestamp: float) -> None:
        Signal.put(self, value, timestamp=timestamp, force=True)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        if self.units:
            desc[self.name]["units"] = self.units
        return desc


class MeterMqttStatus(Device):
    """The MQTT status of meter ``meter`` (its MQTT name) as signals.

    Give an open :class:`~smartmeter_ophyd.client.MqttBroker` to share one connection among
    many meters, or ``host``/``port`` to open one (closed by :meth:`close`).
    """

    power = Cpt(StatusSignal, value=math.nan, units="W", kind=Kind.hinted)
    energy = Cpt(StatusSignal, value=math.nan, units="kWh", kind=Kind.normal)
    current = Cpt(StatusSignal, value=math.nan, units="A", kind=Kind.normal)
    voltage = Cpt(StatusSignal, value=math.nan, units="V", kind=Kind.hinted)
    meter_ts = Cpt(StatusSignal, value=0, units="s", kind=Kind.normal)
    received_at = Cpt(StatusSignal, value=math.nan, units="s", kind=Kind.normal)
    time_source = Cpt(StatusSignal, value="", kind=Kind.normal)

    def __init__(
        self,
        meter: str,
        *,
        broker: MqttBroker | None = None,
        host: str | None = None,
        port: int = 1883,
        status_timeout: float = STATUS_TIMEOUT_S,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name or meter, **kwargs)
        if broker is None and host is None:
            raise ValueError(f"smartmeter {meter}: give an MqttBroker or the broker's host")
        self.meter = meter
        self.status_timeout = float(status_timeout)
        self._own_broker = broker is None
        self.broker = broker if broker is not None else MqttBroker(host or "", port)
        self._lock = threading.Lock()
        self._waiters: list[Status] = []
        self.last_status: MeterStatus | None = None
        self._unsubscribe = self.broker.subscribe_status(self._on_status, meter=meter)
        latest = self.broker.status(meter)
        if latest is not None:
            self._on_status(latest)

    def _on_status(self, status: MeterStatus) -> None:
        """On the broker's loop thread: update every signal, finish waiting triggers."""
        ts = status.timestamp
        self.power._update(status.power_w, ts)
        self.energy._update(status.energy_kwh, ts)
        self.current._update(status.current_a, ts)
        self.voltage._update(status.voltage_v, ts)
        self.meter_ts._update(status.meter_ts or 0, ts)
        self.received_at._update(status.received_at, ts)
        self.time_source._update(status.time_source, ts)
        with self._lock:
            self.last_status = status
            waiters, self._waiters = self._waiters, []
        for st in waiters:
            st.set_finished()

    @property
    def meter_label(self) -> str:
        broker = self.broker.async_broker
        return f"smartmeter {self.meter} (mqtt {broker.host}:{broker.port})"

    def trigger(self) -> Status:
        """Done when the next status arrives; fails after ``status_timeout`` with a
        :class:`~smartmeter_ophyd.client.MeterTimeoutError` naming the meter (none is sent
        while it samples, §8.3)."""
        st = Status(obj=self)
        with self._lock:
            self._waiters.append(st)

        def fail() -> None:
            with self._lock:
                if st not in self._waiters:
                    return
                self._waiters.remove(st)
            st.set_exception(MeterTimeoutError(
                self.meter_label,
                f"no MQTT status within {self.status_timeout} s of the trigger (sent every "
                "~5 s, none while the meter samples, §8.3)",
            ))

        loop = self.broker.loop
        loop.call_soon_threadsafe(loop.call_later, self.status_timeout, fail)
        return st

    def close(self) -> None:
        """Stop updating; close the broker connection if this device opened it."""
        self._unsubscribe()
        if self._own_broker:
            self.broker.close()

    def destroy(self) -> None:
        self.close()
        super().destroy()
