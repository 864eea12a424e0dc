"""Latency percentiles over a window of recent frames: the stream runner's and the demo's readouts."""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["LatencyWindow"]


class LatencyWindow:
    """The last `size` latencies (seconds); :meth:`percentiles` gives (p50, p95), NaN when empty.
    A window, not the whole run, so the figures follow drift."""

    def __init__(self, size: int):
        self._values: collections.deque = collections.deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def extend(self, seconds) -> None:
        self._values.extend(seconds)

    def percentiles(self) -> tuple[float, float]:
        if not self._values:
            return float("nan"), float("nan")
        p50, p95 = np.percentile(np.fromiter(self._values, dtype=float), [50, 95])
        return float(p50), float(p95)
