"""Bluesky/ophyd support for the three-phase SmartMeter (firmware 2.2)."""

__version__ = "0.1.0"
