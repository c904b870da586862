"""What an emulated meter keeps across reboots: its EEPROM configuration and flash log (§10, §3.14).

Stored as one JSON file (or only in memory when no path is given).  Log level and sampling
settings are deliberately *not* here: the firmware does not persist them (§10).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _texts as texts

logger = logging.getLogger(__name__)

WIFI_SLOTS = 5
LOG_FILE_BYTES = 20_000
"""Each of the two flash log files rotates at 20 kB (§3.14)."""


@dataclass
class StoredConfig:
    """The EEPROM contents (§10) plus the two SPIFFS log files (§3.14)."""

    name: str = texts.DEFAULT_NAME
    mqtt_server: str = texts.UNSET
    stream_server: str = texts.UNSET
    time_server: str = texts.DEFAULT_TIME_SERVER
    ssids: list[str] = field(default_factory=lambda: [texts.UNSET] * WIFI_SLOTS)
    pwds: list[str] = field(default_factory=lambda: [texts.UNSET] * WIFI_SLOTS)
    ap_count: int = 0
    calibration: list[float] = field(default_factory=lambda: [1.0] * 6)
    energy_wh: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    reset_hour: int = -1
    reset_minute: int = -1
    energy_reset_ts: float = 0.0
    log_old: list[str] = field(default_factory=list)
    """Rows of ``/log.txt1`` (the rotated-out file)."""
    log_current: list[str] = field(default_factory=list)
    """Rows of ``/log.txt``."""

    def make_default(self, *, keep_name: bool) -> None:
        """factoryReset / basicReset (§3.15): the energy-reset timestamp and the log survive."""
        fresh = StoredConfig(name=self.name if keep_name else texts.DEFAULT_NAME)
        fresh.energy_reset_ts = self.energy_reset_ts
        fresh.log_old, fresh.log_current = self.log_old, self.log_current
        self.__dict__.update(fresh.__dict__)

    def used_ssids(self) -> list[str]:
        return self.ssids[: max(0, min(self.ap_count, WIFI_SLOTS))]

    def append_log_row(self, row: str) -> None:
        """Append one flash row, rotating at 20 kB into the older file (2 files, §3.14)."""
        size = sum(len(r) + 2 for r in self.log_current)
        if size + len(row) + 2 > LOG_FILE_BYTES:
            self.log_old, self.log_current = self.log_current, []
        self.log_current.append(row)

    def clear_log(self) -> None:
        self.log_old, self.log_current = [], []


class StateStore:
    """Loads and saves a :class:`StoredConfig`; calibration outside 0.1…10 is reset at load (§10)."""

    def __init__(self, path: Path | None, initial: StoredConfig) -> None:
        self.path = path
        self.config = initial
        if path is not None and path.exists():
            self.config = self._load(path, initial)

    @staticmethod
    def _load(path: Path, initial: StoredConfig) -> StoredConfig:
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("state file %s unreadable (%s); using defaults", path, exc)
            return initial
        known = {k: v for k, v in raw.items() if k in StoredConfig.__dataclass_fields__}
        config = StoredConfig(**known)
        config.calibration = [
            c if isinstance(c, int | float) and 0.1 <= c <= 10 else 1.0 for c in config.calibration
        ]
        return config

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(asdict(self.config), indent=1))
        os.replace(tmp, self.path)
