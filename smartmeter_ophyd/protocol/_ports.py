"""The meter's network ports, defined once (protocol.md §1).

Limits: these are the firmware's compiled-in numbers; a meter behind NAT or an emulator on
ephemeral ports is reached on other ports, which callers pass explicitly.
"""

from __future__ import annotations

from typing import Final

COMMAND_PORT: Final = 54321
"""TCP command connection; also carries the samples of ``"type":"TCP"`` sessions (§2)."""
STREAM_PORT: Final = 54322
"""TCP raw stream of an idle meter (§7.1), and the port a meter dials out to (§7.2)."""
UDP_PORT: Final = 54323
"""The author's client default for UDP sampling; the firmware never defaults to it (§4.1)."""
