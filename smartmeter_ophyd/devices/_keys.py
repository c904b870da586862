"""One scalar data key of an event stream (bluesky ``DataKey``), as the small streams use it."""

from __future__ import annotations

from typing import Any


def scalar_key(source: str, dtype: str, dtype_numpy: str | None, units: str = "") -> dict[str, Any]:
    """A shape-``[]`` key; ``dtype_numpy`` and ``units`` only where they say something."""
    key: dict[str, Any] = {"source": source, "dtype": dtype, "shape": []}
    if dtype_numpy is not None and dtype != "string":
        key["dtype_numpy"] = dtype_numpy
    if units:
        key["units"] = units
    return key
