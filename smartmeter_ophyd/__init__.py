"""Bluesky/ophyd support for the three-phase SmartMeter (firmware 2.2).

``__version__`` is the package's one version (pyproject.toml reads it).  Importing this
package loads nothing else: :class:`SmartMeter` (ophyd, bluesky) is imported on first use, so
the codec, the client and the emulator import without ophyd, bluesky or h5py.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["SmartMeter", "__version__"]

if TYPE_CHECKING:
    from .devices import SmartMeter


def __getattr__(name: str) -> Any:
    if name == "SmartMeter":
        from .devices import SmartMeter

        return SmartMeter
    raise AttributeError(f"module 'smartmeter_ophyd' has no attribute {name!r}")
