"""Judging a meter's reply to ``stop``, the same way for every transport (TCP, UDP, MQTT).

The firmware answers ``stop`` with its counts and ``"error":false`` last when it was
sampling, and with ``{"error":true,"cmd":"stop"}`` and nothing else when it was idle (also
during a scheduled start's countdown, §4.8, §12 #3): the session had already ended, for
example stopped from another connection.  That is no failure of the stop - it is logged and
the view returned (``was_idle``), so the session ends as "stopped elsewhere".  Any other
failed stop reply is not one the firmware sends; it is refused with
:class:`MeterCommandRejected` naming the meter and quoting its message, and a reply that is
not a stop reply at all with :class:`MeterProtocolError`.

No I/O: the transports exchange the command and hand the reply here.
"""

from __future__ import annotations

import logging

from ..protocol import RemoteProtocolError, Reply, StopReply, parse_reply
from ._errors import MeterCommandRejected, MeterProtocolError

logger = logging.getLogger(__name__)


def judge_stop_reply(meter: str, reply: Reply) -> StopReply:
    """The view of ``reply`` to ``stop`` from ``meter`` (its label), or the typed error."""
    try:
        view = parse_reply(reply, "stop")
    except RemoteProtocolError as exc:
        raise MeterProtocolError(meter, f"reply to 'stop': {exc}") from exc
    if not isinstance(view, StopReply):
        raise MeterProtocolError(meter, f"unusable stop reply: {reply.raw}")
    if view.was_idle:
        logger.warning("%s: stop: the meter says it was not sampling (session already ended)",
                       meter)
    elif not view.succeeded:
        raise MeterCommandRejected(meter, "stop", view.message, dict(reply.fields))
    return view
