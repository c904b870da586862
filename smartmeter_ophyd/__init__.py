"""Bluesky/ophyd support for the three-phase SmartMeter (firmware 2.2)."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["SmartMeter", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so the codec, client and emulator import without ophyd/bluesky/h5py.
    if name == "SmartMeter":
        from .devices import SmartMeter

        return SmartMeter
    raise AttributeError(f"module 'smartmeter_ophyd' has no attribute {name!r}")
