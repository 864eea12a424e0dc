"""Soak the real-time demo: many concurrent loopback clients for a while, well-behaved, flooding and
disconnecting mid-frame; count crashes, unanswered frames, memory and per-client latency.

    python benchmarks/soak.py --clients 50 --seconds 60          # serves the tiny pipeline itself
    python benchmarks/soak.py --url http://127.0.0.1:8000        # an already running `fastdiff demo`

Every frame a connected client sends must be answered: by its output, by a "dropped" notice (a newer
frame replaced it) or by an error. A client that disconnects on purpose is not owed answers.
Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BEHAVIOURS = ("steady", "flood", "quitter")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _frames(side: int, count: int, seed: int) -> list[bytes]:
    from fastdiff.shapes import moving_shapes_clip

    out = []
    for image in moving_shapes_clip(num_frames=count, size=side, seed=seed):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


class _Client(threading.Thread):
    def __init__(self, url: str, behaviour: str, frames: list[bytes], stop: threading.Event, seed: int,
                 timeout: float):
        super().__init__(daemon=True)
        self.url, self.behaviour, self.frames, self.stop, self.timeout = url, behaviour, frames, stop, timeout
        self.rng = random.Random(seed)
        self.sent = self.answered = self.outputs = self.dropped = self.errors = 0
        self.latencies: list[float] = []
        self.crash: str | None = None
        self.refused = 0

    def _count(self, message) -> None:
        if isinstance(message, bytes):
            return
        reply = json.loads(message)
        kind = reply.get("type")
        if kind == "output":
            self.outputs += 1
            self.answered += 1
            self.latencies.append(reply["latency_ms"])
        elif kind == "dropped":
            self.dropped += 1
            self.answered += 1
        elif kind == "error" and reply.get("index") is not None:
            self.errors += 1
            self.answered += 1

    def run(self) -> None:
        from websockets.sync.client import connect

        try:
            while not self.stop.is_set():
                with connect(self.url, max_size=None, open_timeout=self.timeout) as ws:
                    if json.loads(ws.recv(timeout=self.timeout)).get("type") != "ready":   # the server is full
                        self.refused += 1
                        time.sleep(0.2)
                        continue
                    ws.send(json.dumps({"type": "start", "mode": "img2img", "prompt": "a red circle"}))
                    if self.behaviour == "quitter":   # a frame, then gone before its answer
                        ws.send(self.rng.choice(self.frames))
                        continue
                    self._stream(ws)
                    return
                time.sleep(self.rng.uniform(0.05, 0.3))
        except Exception as error:  # noqa: BLE001 - a client that fails is what this script counts
            self.crash = f"{type(error).__name__}: {error}"

    def _stream(self, ws) -> None:
        while not self.stop.is_set():
            ws.send(self.rng.choice(self.frames))
            self.sent += 1
            if self.behaviour == "steady":   # one frame at a time: wait for its answer
                while self.answered < self.sent and not self.stop.is_set():
                    self._count(ws.recv(timeout=self.timeout))
            else:   # flood: answers are read as they come
                time.sleep(0.005)
                while True:
                    try:
                        self._count(ws.recv(timeout=0))
                    except TimeoutError:
                        break
        deadline = time.monotonic() + self.timeout   # drain: every frame sent is owed an answer
        while self.answered < self.sent and time.monotonic() < deadline:
            try:
                self._count(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                break


def soak(url: str, clients: int = 50, seconds: float = 60, frame_side: int = 64, seed: int = 0,
         timeout: float = 120) -> dict:
    """Run `clients` loopback clients against the demo at `url` for `seconds`; the report."""
    import urllib.request

    ws_url = url.replace("http://", "ws://") + "/ws"
    frames = _frames(frame_side, 8, seed)
    stop = threading.Event()
    behaviours = [BEHAVIOURS[i % len(BEHAVIOURS)] for i in range(clients)]
    crew = [_Client(ws_url, b, frames, stop, seed + i, timeout) for i, b in enumerate(behaviours)]
    rss_start = _rss_mb()
    for client in crew:
        client.start()
    time.sleep(seconds)
    stop.set()
    for client in crew:
        client.join(timeout + 30)
    with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
        healthy = json.loads(response.read()).get("status") == "ok"
    streaming = [c for c in crew if c.behaviour != "quitter"]
    latencies = {i: _percentiles(c.latencies) for i, c in enumerate(crew) if c.latencies}
    return {
        "clients": clients, "seconds": seconds, "behaviours": {b: behaviours.count(b) for b in BEHAVIOURS},
        "crashes": sum(c.crash is not None for c in crew) + (not healthy),
        "crash_reasons": sorted({c.crash for c in crew if c.crash}),
        "frames_sent": sum(c.sent for c in streaming), "outputs": sum(c.outputs for c in streaming),
        "dropped": sum(c.dropped for c in streaming), "errors": sum(c.errors for c in streaming),
        "unanswered": sum(max(0, c.sent - c.answered) for c in streaming),
        "refused_sessions": sum(c.refused for c in crew),
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(_rss_mb(), 1),
        "latency_ms_per_client": latencies,
    }


def _percentiles(values: list[float]) -> dict:
    import numpy as np

    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "n": len(values)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="a running demo; default: serve the tiny pipeline here")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--frame-side", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/soak.json")
    args = parser.parse_args(argv)
    if args.url:
        report = soak(args.url, args.clients, args.seconds, args.frame_side, args.seed)
    else:
        import torch

        from fastdiff.architectures import tiny_sd_pipeline
        from fastdiff.demo import DemoConfig, create_app, serve_in_thread

        torch.set_num_threads(1)
        config = DemoConfig(max_sessions=args.clients + 4, threads=1, steps=(40,))
        with serve_in_thread(create_app(tiny_sd_pipeline(scheduler="lcm"), config), config) as url:
            report = soak(url, args.clients, args.seconds, args.frame_side, args.seed)
    report["growth"] = round(report["rss_end_mb"] / report["rss_start_mb"] - 1, 3)
    print(json.dumps({k: v for k, v in report.items() if k != "latency_ms_per_client"}, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
