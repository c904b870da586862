"""The command table: every firmware command once, as the asyncio and the blocking method.

Each entry of :class:`MeterCommands` is an async implementation that runs on an
:class:`~._async.AsyncMeterClient`, wrapped in a :class:`CommandMethod`.  Read through an
``AsyncMeterClient`` it is a coroutine method; read through a
:class:`~._sync.MeterClient` it is a blocking method that runs the same coroutine on the
shared loop thread.  ``ParamSpec`` carries each signature to both, so mypy and IDEs see
``client.ntp_sync(background: bool = False, *, timeout: float | None = None)`` either way.

Both client classes derive from :class:`MeterCommands` and provide ``_bind_command``.
Commands that need more than a request and a typed reply (sessions, subscriptions,
lifecycle) are ordinary methods of the clients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from ..protocol import (
    KEEPALIVE,
    AddWifi,
    Ade9kAccess,
    Ade9kReply,
    BasicReset,
    ClearLog,
    Command,
    Cts,
    DelWifi,
    DeviceInfo,
    EnergyReading,
    FactoryReset,
    GetCurrent,
    GetEnergy,
    GetLog,
    GetPeriod,
    GetPhaseAngle,
    GetPower,
    GetVoltage,
    Info,
    LineValues,
    LogDump,
    LogLevel,
    LogLevelReply,
    MessageReply,
    NtpReply,
    NtpSync,
    PowerReading,
    RemoteProtocolError,
    Reply,
    ReplyView,
    ResetEnergy,
    Restart,
    SetCalibration,
    SetDailyRestart,
    SetLogLevel,
    SetMqttServer,
    SetName,
    SetStreamServer,
    SetTimeServer,
    StopReply,
    WifiReply,
    parse_log_dump,
)
from ._errors import MeterCommandError, MeterError, MeterProtocolError

if TYPE_CHECKING:
    from ._async import AsyncMeterClient
    from ._sync import MeterClient

P = ParamSpec("P")
R = TypeVar("R")


class CommandMethod(Generic[P, R]):
    """One table entry: ``impl(async_client, *args, **kwargs)`` exposed on both clients."""

    def __init__(
        self, impl: Callable[Concatenate[AsyncMeterClient, P], Coroutine[Any, Any, R]]
    ) -> None:
        self.impl = impl
        self.name = impl.__name__
        self.__doc__ = impl.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> CommandMethod[P, R]: ...
    @overload
    def __get__(
        self, obj: AsyncMeterClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __get__(self, obj: MeterClient, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        return self if obj is None else obj._bind_command(self)


command = CommandMethod
"""Decorator: turn an async implementation into a table entry."""


class MeterCommands:
    """Every firmware command (§3) as a method; the base of both clients."""

    def _bind_command(self, method: CommandMethod[P, R]) -> Callable[..., Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ readings

    @command
    async def get_info(self: AsyncMeterClient, *, timeout: float | None = None) -> DeviceInfo:
        """Ask for the info line (§2.5) and return it; also updates :attr:`info`."""
        return await self.requests.typed(Info(), DeviceInfo, timeout)

    @command
    async def get_voltage(self: AsyncMeterClient) -> LineValues:
        """RMS voltage per line, V (§3.10)."""
        return await self.requests.typed(self.requests.build(GetVoltage), LineValues)

    @command
    async def get_current(self: AsyncMeterClient) -> LineValues:
        """RMS current per line, mA (§3.10)."""
        return await self.requests.typed(self.requests.build(GetCurrent), LineValues)

    @command
    async def get_power(self: AsyncMeterClient) -> PowerReading:
        """Active/reactive/'apparent' power per line (§3.10; apparent = reactive, §12 #9)."""
        return await self.requests.typed(self.requests.build(GetPower), PowerReading)

    @command
    async def get_energy(self: AsyncMeterClient) -> EnergyReading:
        """Energy per line since the last reset, Wh (§3.10; resets the ADE accumulators)."""
        return await self.requests.typed(self.requests.build(GetEnergy), EnergyReading)

    @command
    async def get_frequency(self: AsyncMeterClient) -> LineValues:
        """Line frequency per line, Hz (the firmware's ``getPeriod``, §12 #13)."""
        return await self.requests.typed(self.requests.build(GetPeriod), LineValues)

    @command
    async def get_phase_angle(self: AsyncMeterClient) -> LineValues:
        """Voltage-current phase angle per line, degrees (§3.10)."""
        return await self.requests.typed(self.requests.build(GetPhaseAngle), LineValues)

    # ------------------------------------------------------------------ settings

    @command
    async def set_name(self: AsyncMeterClient, name: str) -> MessageReply:
        """Rename the meter (§3.2; at most 19 bytes).  Re-reads the info line afterwards."""
        reply = await self.requests.typed(self.requests.build(SetName, name), MessageReply)
        with contextlib.suppress(MeterError):
            await self.get_info()
        return reply

    @command
    async def set_mqtt_server(
        self: AsyncMeterClient, server: str, *, timeout: float | None = None
    ) -> MessageReply:
        """MQTT broker (§3.3; ``"-"`` disables).  The meter tries to connect before replying."""
        return await self.requests.typed(self.requests.build(SetMqttServer, server), MessageReply, timeout)

    @command
    async def set_stream_server(self: AsyncMeterClient, server: str) -> MessageReply:
        """Host the meter dials on port 54322 every 30 s (§3.4, §7.2; ``"-"`` unsets)."""
        return await self.requests.typed(self.requests.build(SetStreamServer, server), MessageReply)

    @command
    async def set_time_server(
        self: AsyncMeterClient, server: str, *, timeout: float | None = None
    ) -> MessageReply:
        """NTP server (§3.5); the meter syncs (blocking) before replying."""
        return await self.requests.typed(self.requests.build(SetTimeServer, server), MessageReply, timeout)

    @command
    async def add_wifi(self: AsyncMeterClient, ssid: str, password: str = "") -> WifiReply:
        """Add a WiFi network (§3.6; the error flag is inverted).  The password is never logged."""
        return await self.requests.typed(self.requests.build(AddWifi, ssid, password), WifiReply)

    @command
    async def del_wifi(self: AsyncMeterClient, ssid: str) -> WifiReply:
        """Remove a WiFi network (§3.6)."""
        return await self.requests.typed(self.requests.build(DelWifi, ssid), WifiReply)

    @command
    async def ntp_sync(
        self: AsyncMeterClient, background: bool = False, *, timeout: float | None = None
    ) -> NtpReply:
        """NTP sync (§3.7; inverted error flag).  ``background`` returns at once."""
        return await self.requests.typed(self.requests.build(NtpSync, background), NtpReply, timeout)

    @command
    async def set_calibration(
        self: AsyncMeterClient, factors: tuple[float, ...] | list[float]
    ) -> MessageReply:
        """Calibration ``[v1,i1,v2,i2,v3,i3]`` (§3.8; stored, never applied)."""
        return await self.requests.typed(self.requests.build(SetCalibration, tuple(factors)), MessageReply)

    @command
    async def reset_energy(
        self: AsyncMeterClient,
        energy: tuple[float, float, float] | None = None,
        ts: int | None = None,
    ) -> MessageReply:
        """Reset the energy counters (§3.9), optionally to ``energy`` Wh at unix time ``ts``."""
        return await self.requests.typed(self.requests.build(ResetEnergy, energy, ts), MessageReply)

    @command
    async def set_daily_restart(self: AsyncMeterClient, hour: int, minute: int) -> MessageReply:
        """Reboot daily at local ``hour:minute`` (§3.12); ``hour=-1`` disables."""
        return await self.requests.typed(self.requests.build(SetDailyRestart, hour, minute), MessageReply)

    @command
    async def set_log_level(self: AsyncMeterClient, level: LogLevel | str) -> LogLevelReply:
        """This connection's log level (§3.1; not persisted, re-applied on reconnect if it
        was given to the constructor)."""
        request = self.requests.build(SetLogLevel, level)
        reply = await self.requests.typed(request, LogLevelReply)
        self._log_level = request.level
        return reply

    # ------------------------------------------------------------------- the log

    @command
    async def get_log(self: AsyncMeterClient, *, timeout: float | None = None) -> list[str]:
        """The stored WARNING/ERROR log rows, oldest first (§3.14)."""
        answered = await self.requests.exchange(GetLog(), timeout)
        self.requests.check(GetLog(), answered.reply)
        dump = answered.request.dump
        if dump is None:
            raise MeterProtocolError(self.meter_label, "getLog reply came without the log dump")
        if isinstance(dump, Reply):
            view = self.requests.view(GetLog(), dump)
            if isinstance(view, LogDump):
                return list(view.rows)
        try:
            return parse_log_dump(dump)
        except RemoteProtocolError as exc:
            raise MeterProtocolError(self.meter_label, f"getLog: {exc}") from exc

    @command
    async def clear_log(self: AsyncMeterClient) -> MessageReply:
        """Delete the stored log (§3.11)."""
        return await self.requests.typed(self.requests.build(ClearLog), MessageReply)

    # ------------------------------------------------------------- the ADE9000

    @command
    async def ade9k_read(self: AsyncMeterClient, address: int, size: int = 32) -> int:
        """Read an ADE9000 register (§3.13)."""
        reply = await self.requests.typed(self.requests.build(Ade9kAccess, address, size), Ade9kReply)
        if reply.reg_value is None:
            raise MeterProtocolError(self.meter_label, "ade9k reply without regValue")
        return reply.reg_value

    @command
    async def ade9k_write(
        self: AsyncMeterClient, address: int, value: int, size: int = 32
    ) -> Ade9kReply:
        """Write an ADE9000 register; the reply has the old and the re-read value (§3.13)."""
        return await self.requests.typed(self.requests.build(Ade9kAccess, address, size, value), Ade9kReply)

    # ------------------------------------------------------------------ reboots

    @command
    async def restart(self: AsyncMeterClient, *, timeout: float | None = None) -> None:
        """Reboot the meter (§3.15); returns when the connection has dropped."""
        await self.requests.reboot(Restart(), timeout)

    @command
    async def factory_reset(self: AsyncMeterClient, *, timeout: float | None = None) -> None:
        """Restore all defaults including the name, then reboot (§3.15)."""
        await self.requests.reboot(FactoryReset(), timeout)

    @command
    async def basic_reset(self: AsyncMeterClient, *, timeout: float | None = None) -> None:
        """Restore defaults except the name, then reboot (§3.15)."""
        await self.requests.reboot(BasicReset(), timeout)

    # ------------------------------------------------------------- line control

    @command
    async def probe(self: AsyncMeterClient, *, timeout: float | None = None) -> None:
        """Send ``?``; returns when the meter answered ``Info:Setup done`` (§2.2)."""
        await self.requests.exchange(None, timeout)

    @command
    async def keepalive(self: AsyncMeterClient) -> None:
        """Send ``!`` now (no reply, §2.2)."""
        self._write(KEEPALIVE)

    # -------------------------------------------------------------- sampling

    @command
    async def cts(self: AsyncMeterClient, ready: bool) -> None:
        """Set ready-to-send (§5.1).  Prefer :meth:`SamplingSession.cts`, which also tracks
        the pause for :meth:`SamplingSession.buffer_fill_estimate`."""
        await self.requests.typed(self.requests.build(Cts, ready), MessageReply)

    @command
    async def request_samples(self: AsyncMeterClient, n: int) -> None:
        """``reqSamples`` for this connection's running session (§5.2); see
        :meth:`SamplingSession.request_samples`."""
        session = self.session
        if session is None:
            raise MeterCommandError(
                self.meter_label, "reqSamples needs a running sampling session on this client"
            )
        await session.request_samples(n)

    @command
    async def stop(self: AsyncMeterClient, *, timeout: float | None = None) -> StopReply:
        """Send ``stop`` (§4.8) and return the reply.  Stops any session of the meter (also
        one started by another client, or the port-54322 stream); this client's own session
        is ended and reconciled as by :meth:`SamplingSession.stop`."""
        return await self._stop(timeout)

    @command
    async def request(
        self: AsyncMeterClient, command: Command, *, timeout: float | None = None
    ) -> ReplyView | None:
        """Send any codec command; return its typed reply view or raise a typed error.

        ``info`` returns :class:`DeviceInfo`; ``reqSamples`` and the restart family return
        None (they have no reply).  A failed command raises :class:`MeterBusyError` or
        :class:`MeterCommandRejected`.
        """
        return await self._request(command, timeout)

