"""The MQTT sampling session: one JSON message per sample (§4.14) in, :class:`Block` out."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ...protocol import Samples
from .._session import SamplingSession

logger = logging.getLogger(__name__)


class MqttSamplingSession(SamplingSession):
    """A :class:`SamplingSession` fed by the meter's per-sample messages (§4.14).

    ``publish_times`` holds, per received sample, the ``ts`` of its message: the meter's
    clock when it *published* the sample (not when it was sampled; ``0.0`` before the
    meter's first NTP sync).
    """

    def __init__(self, *, unit: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unit = unit
        self.publish_times: list[float] = []
        self.malformed_messages = 0

    def message(self, fields: dict[str, Any]) -> None:
        values = fields.get("values")
        if (
            fields.get("unit") != self.unit
            or not isinstance(values, list)
            or len(values) != len(self.channels)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        ):
            self.malformed_messages += 1
            logger.warning("%s: MQTT sample message not usable, not counted as received: %.120r",
                           self.meter, fields)
            return
        try:
            self.publish_times.append(float(fields.get("ts", "nan")))
        except (TypeError, ValueError):
            self.publish_times.append(math.nan)
        row = np.asarray(values, dtype=np.float32).reshape(1, -1)
        self._feed([Samples(values=row)])
