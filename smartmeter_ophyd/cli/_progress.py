"""One progress bar per meter, driven by each flyer's ``complete()`` status.

:class:`MeterProgress` is a RunEngine ``waiting_hook``.  The fly plans wait on the meters'
``complete()`` statuses (:class:`~smartmeter_ophyd.devices.ProgressStatus`) in short slices
between collects; bluesky's ``ProgressBarManager`` would draw and tear down bars on every
slice.  Here each status gets one bar for its whole life: the status's watchers report
``current``/``target`` samples, and the bar closes when the status finishes.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any


class MeterProgress:
    """``RE.waiting_hook`` drawing one ``tqdm`` bar per meter fly (stderr)."""

    def __init__(self, on_first: Callable[[list[str]], None] | None = None, *,
                 show_target: bool = True) -> None:
        self._show_target = show_target
        self._bars: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._on_first = on_first
        self._announced = False

    def __call__(self, statuses: Iterable[Any] | None) -> None:
        if not statuses:
            return
        from ..devices import ProgressStatus

        new = [s for s in statuses
               if isinstance(s, ProgressStatus) and id(s) not in self._bars]
        if new and not self._announced and self._on_first is not None:
            self._announced = True
            self._on_first([s.device.name for s in new])
        with self._lock:
            for status in new:
                self._bars[id(status)] = self._bar(status)
        for status in new:
            status.watch(self._updater(id(status)))
            status.add_callback(self._closer(id(status)))

    def _bar(self, status: Any) -> Any:
        from tqdm import tqdm

        return tqdm(total=status.target if self._show_target else None, desc=status.device.name, unit=" samples",
                    unit_scale=True, file=sys.stderr, leave=True, dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 5.0,
                    position=len(self._bars) if sys.stderr.isatty() else None)

    def _updater(self, key: int) -> Callable[..., None]:
        def update(*, current: int | None = None, **_kwargs: Any) -> None:
            bar = self._bars.get(key)
            if bar is not None and current is not None:
                bar.update(max(0, int(current) - bar.n))

        return update

    def _closer(self, key: int) -> Callable[[Any], None]:
        def close(_status: Any) -> None:
            with self._lock:
                bar = self._bars.get(key)
            if bar is not None:
                bar.refresh()
                bar.close()

        return close

    def close(self) -> None:
        with self._lock:
            bars = list(self._bars.values())
        for bar in bars:
            bar.close()
