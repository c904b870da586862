"""Error hierarchy of the codec.

``ProtocolError`` is the root of every exception the codec raises.  Mixins let callers
catch either the codec's own type or the builtin they expect (``ValueError``).

* ``CommandError`` -- a command the firmware would reject or mishandle, refused before it
  is ever encoded (we never send something we know to be wrong).
* ``RemoteProtocolError`` -- the peer sent bytes the codec cannot make sense of where the
  protocol leaves no room for tolerance (e.g. a reply that is not JSON where JSON is due).
  Stream decoding never raises it for garbage: garbage is reported as an event.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of all codec errors."""


class CommandError(ProtocolError, ValueError):
    """A command argument the firmware would reject or mishandle.

    The message names the offending parameter, the value given and what is allowed.
    """


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol in a way that cannot be tolerated."""
