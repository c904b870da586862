"""Keep a Tiled catalog open from printing what its user did not ask for.

Opening an embedded catalog (``databroker.from_profile`` on a ``direct`` profile) builds a
Tiled app in-process: its start-up logs ``Tiled version …`` at INFO through a handler Tiled
attaches itself (so it prints even when the root logger is at WARNING), and the ASGI client
it uses emits ``StarletteDeprecationWarning: Using httpx with starlette.testclient …``.
Neither says anything about the user's data.  :func:`quiet_tiled` turns both off, once per
process, and leaves every other Tiled warning or error alone.

Limits: the Tiled logger's level is set after importing ``tiled.server.app`` (its import
resets the level to INFO); ``-v`` on the command line still shows Tiled's INFO through our
own ``smartmeter_ophyd`` loggers only.
"""

from __future__ import annotations

import logging
import warnings

_DONE = False

STARLETTE_TESTCLIENT_MESSAGE = r"Using `httpx` with `starlette\.testclient` is deprecated"


def quiet_tiled() -> None:
    """Silence Tiled's start-up banner and Starlette's test-client deprecation (idempotent)."""
    global _DONE
    warnings.filterwarnings("ignore", message=STARLETTE_TESTCLIENT_MESSAGE)
    if _DONE:
        return
    try:
        import tiled.server.app  # noqa: F401  (sets its logger to INFO on import)
    except ImportError:  # tiled without its server extra: nothing prints
        pass
    logging.getLogger("tiled.server.app").setLevel(logging.WARNING)
    _DONE = True
