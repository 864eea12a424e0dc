"""Frame counts and timings for the demo's readouts (one per client, one for the whole server)."""

from __future__ import annotations

import collections
import math
import time

from ..stream.stats import LatencyWindow

RATE_WINDOW_S = 5.0  # frames/s is measured over the last few seconds, so it follows changes
LATENCY_WINDOW = 512  # latency percentiles are over the most recent outputs


class FrameStats:
    """Outputs, drops and errors, frames/s and latency percentiles.

    Used from the server's event loop only, so it takes no lock."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.outputs = 0  # frames (or txt2img images) sent back
        self.dropped = 0  # stale frames replaced by a newer one before they were processed
        self.errors = 0  # messages refused with an error
        self._started = clock()
        self._recent = collections.deque()  # output times within RATE_WINDOW_S
        self._latencies = LatencyWindow(LATENCY_WINDOW)

    def output(self, latency_s: float) -> None:
        now = self._clock()
        self.outputs += 1
        self._recent.append(now)
        self._latencies.add(latency_s)

    def drop(self) -> None:
        self.dropped += 1

    def error(self) -> None:
        self.errors += 1

    def frames_per_s(self) -> float:
        now = self._clock()
        while self._recent and self._recent[0] <= now - RATE_WINDOW_S:
            self._recent.popleft()
        span = min(RATE_WINDOW_S, now - self._started)
        return len(self._recent) / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        p50, p95 = (None if math.isnan(s) else round(s * 1000, 2) for s in self._latencies.percentiles())
        return {"frames_per_s": round(self.frames_per_s(), 2), "latency_p50_ms": p50, "latency_p95_ms": p95,
                "outputs": self.outputs, "dropped": self.dropped, "errors": self.errors}
