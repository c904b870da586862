"""Bluesky plans for SmartMeters (generators; filled by the plans issue)."""
