"""Errors the meter client raises.  Every one names the meter it concerns.

The message always starts with the meter's label, ``smartmeter <name> (<host>:<port>)``, so
a log line or traceback is enough to know which of many meters failed and how.  ``.meter``
carries the same label for programs.

* :class:`MeterConnectionError` -- could not connect, the meter refused the 4th client,
  or the connection dropped (restart, overflow reboot, cable).
* :class:`MeterTimeoutError` -- a reply did not come in time (also a :class:`TimeoutError`).
* :class:`MeterBusyError` -- the meter is sampling and refused a busy-checked command (§2.8).
* :class:`MeterCommandRejected` -- the firmware replied with an error; the message quotes
  the firmware's ``msg``.
* :class:`MeterProtocolError` -- the peer does not speak the SmartMeter protocol (garbage
  instead of the info line, a reply we cannot interpret).
* :class:`MeterCommandError` -- a command the codec refused before anything was sent
  (wraps :class:`~smartmeter_ophyd.protocol.CommandError`; also a :class:`ValueError`).
"""

from __future__ import annotations

from typing import Any


class MeterError(Exception):
    """Root of every error of the meter client.  ``meter`` is the meter's label."""

    def __init__(self, meter: str, message: str) -> None:
        super().__init__(f"{meter}: {message}")
        self.meter = meter
        self.detail = message


class MeterConnectionError(MeterError, ConnectionError):
    """The connection could not be made or was lost."""


class MeterIdentityError(MeterConnectionError):
    """A reconnect reached a different meter at the same address; the client stays away."""


class MeterTimeoutError(MeterError, TimeoutError):
    """A reply (or data) did not arrive within its timeout."""


class MeterProtocolError(MeterError):
    """The peer sent something the SmartMeter protocol does not allow here."""


class MeterCommandRejected(MeterError):  # noqa: N818 (name fixed by the issue)
    """The firmware answered a command with an error.

    ``firmware_msg`` is the firmware's ``msg`` text (None if the reply had none) and
    ``reply`` the reply's fields as received.
    """

    def __init__(
        self,
        meter: str,
        command: str,
        firmware_msg: str | None,
        reply: dict[str, Any] | None = None,
    ) -> None:
        text = f"{command!r} rejected by the firmware"
        if firmware_msg:
            text += f": {firmware_msg!r}"
        super().__init__(meter, text)
        self.command = command
        self.firmware_msg = firmware_msg
        self.reply = dict(reply or {})


class MeterBusyError(MeterCommandRejected):
    """The meter is sampling and refused a busy-checked command (§2.8)."""


class MeterCommandError(MeterError, ValueError):
    """A command refused by the codec before it was sent (bad argument)."""
