"""Soak the real-time demo: many concurrent loopback clients for a while, well-behaved, flooding,
disconnecting mid-frame and sending over the caps; count crashes, unanswered frames, memory,
per-client latency, and whether the session limit and the size caps held.

    python benchmarks/soak.py --clients 50 --seconds 60          # serves the tiny pipeline itself
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID   # a running `fastdiff demo`

Every frame a connected client sends must be answered: by its output, by a "dropped" notice (a newer
frame replaced it) or by an error. A client that disconnects on purpose is not owed answers. There
are more clients than the server takes sessions: the ones turned away retry.
Bounded in count and time; loopback only. The server runs in a process of its own, so that its
memory is measured alone and the clients don't take its interpreter's time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import queue
import random
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BEHAVIOURS = ("steady", "flood", "quitter", "oversize")  # oversize: messages over the size cap, frames over the side cap


def _rss_mb(pid) -> float | None:
    """The resident memory of process `pid` in MB (None: unknown)."""
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


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
        self.capped = 0   # errors that name the message-size or frame-side cap
        self.oversized: list[bytes] = []

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
            self.capped += "the limit is" in reply["message"] or "must each be between" in reply["message"]

    def run(self) -> None:
        from websockets.sync.client import connect

        try:
            while not self.stop.is_set():
                with connect(self.url, max_size=None, open_timeout=self.timeout) as ws:
                    ready = json.loads(ws.recv(timeout=self.timeout))
                    if ready.get("type") != "ready":   # the server is full
                        self.refused += 1
                        time.sleep(0.2)
                        continue
                    self.oversized = _over_the_caps(ready["limits"])
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
            ws.send(self.rng.choice(self.oversized if self.behaviour == "oversize" else self.frames))
            self.sent += 1
            if self.behaviour in ("steady", "oversize"):   # one frame at a time: wait for its answer
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


def _over_the_caps(limits: dict) -> list[bytes]:
    """Two binary messages the server must refuse: one a byte over its message-size cap, and a JPEG
    wider than its frame-side cap."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (limits["max_frame_side"] + 8, 16)).save(buffer, format="JPEG")
    return [bytes(limits["max_message_bytes"] + 1), buffer.getvalue()]


def _sessions(url: str, timeout: float) -> tuple[int, int]:
    """(sessions open, the limit) from the server's /health."""
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
        health = json.loads(response.read())
    return health["sessions"], health["max_sessions"]


def _warm_up(ws_url: str, frames: list[bytes], seed: int, timeout: float, seconds: float = 3.0) -> None:
    """One steady client for a few seconds, so that the memory at the start is a server's that has
    run frames (its first calls allocate what every later one reuses)."""
    stop = threading.Event()
    client = _Client(ws_url, "steady", frames, stop, seed - 1, timeout)
    client.start()
    time.sleep(seconds)
    stop.set()
    client.join(timeout + 30)
    if client.crash or client.answered < client.sent:
        raise RuntimeError(f"the warm-up client failed: {client.crash or 'frames unanswered'}")


def soak(url: str, clients: int = 50, seconds: float = 60, frame_side: int = 64, seed: int = 0,
         timeout: float = 120, server_pid: int | None = None) -> dict:
    """Run `clients` loopback clients against the demo at `url` for `seconds`; the report.
    With `server_pid`, the server's memory at the start and the end is in it."""
    import urllib.request

    ws_url = url.replace("http://", "ws://") + "/ws"
    frames = _frames(frame_side, 8, seed)
    stop = threading.Event()
    behaviours = [BEHAVIOURS[i % len(BEHAVIOURS)] for i in range(clients)]
    crew = [_Client(ws_url, b, frames, stop, seed + i, timeout) for i, b in enumerate(behaviours)]
    rss_idle = _rss_mb(server_pid)
    _warm_up(ws_url, frames, seed, timeout)
    rss_start = _rss_mb(server_pid)
    memory = []   # (seconds since start, server MB), once a second
    started = time.monotonic()
    for client in crew:
        client.start()
    most_sessions, session_limit = _sessions(url, timeout)
    while (elapsed := time.monotonic() - started) < seconds:
        memory.append((round(elapsed, 1), _rss_mb(server_pid)))
        most_sessions = max(most_sessions, _sessions(url, timeout)[0])
        time.sleep(min(1.0, max(0.0, seconds - elapsed)))
    memory.append((round(time.monotonic() - started, 1), _rss_mb(server_pid)))
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
        "oversize_sent": sum(c.sent for c in crew if c.behaviour == "oversize"),
        "oversize_refused": sum(c.capped for c in crew if c.behaviour == "oversize"),
        "refused_sessions": sum(c.refused for c in crew),
        "most_sessions_seen": most_sessions, "session_limit": session_limit,
        # before any frame, after the warm-up (the start), at the end of the run, and every second between
        "rss_idle_mb": rss_idle, "rss_start_mb": rss_start, "rss_end_mb": memory[-1][1], "rss_mb_over_time": memory,
        "latency_ms_per_client": latencies,
    }


def _serve_tiny(max_sessions: int, urls, stop) -> None:
    """The server process: the demo over the tiny pipeline (LCM, one step), one torch thread."""
    import torch

    from fastdiff.architectures import tiny_sd_pipeline
    from fastdiff.demo import DemoConfig, create_app, serve_in_thread

    torch.set_num_threads(1)
    config = DemoConfig(max_sessions=max_sessions, threads=1, steps=(40,), max_message_bytes=64 * 1024,
                        max_frame_side=256)   # caps near the soak's 64-pixel, ~2 kB frames
    with serve_in_thread(create_app(tiny_sd_pipeline(scheduler="lcm"), config), config) as url:
        urls.put(url)
        stop.wait()


@contextlib.contextmanager
def tiny_server(max_sessions: int = 40, start_timeout: float = 300):
    """Serve the tiny pipeline's demo in a process of its own; yields (base URL, process id)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve_tiny, args=(max_sessions, urls, stop), daemon=True)
    process.start()
    deadline = time.monotonic() + start_timeout
    try:
        while True:   # the URL, unless the server process died first
            try:
                url = urls.get(timeout=1)
                break
            except queue.Empty:
                if not process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the soak's server process did not start (exit code {process.exitcode})") from None
        yield url, process.pid
    finally:
        stop.set()
        process.join(60)
        if process.is_alive():
            process.kill()


def _percentiles(values: list[float]) -> dict:
    import numpy as np

    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "n": len(values)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="a running demo; default: serve the tiny pipeline")
    parser.add_argument("--pid", type=int, default=None, help="the running demo's process id, for its memory")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-sessions", type=int, default=40,
                        help="the served demo's session limit: fewer than the clients, so that it is tested")
    parser.add_argument("--frame-side", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/soak.json")
    args = parser.parse_args(argv)
    if args.url:
        report = soak(args.url, args.clients, args.seconds, args.frame_side, args.seed, server_pid=args.pid)
    else:
        with tiny_server(max_sessions=args.max_sessions) as (url, pid):
            report = soak(url, args.clients, args.seconds, args.frame_side, args.seed, server_pid=pid)
    if report["rss_start_mb"] is not None:
        memory = report["rss_mb_over_time"]
        half = next(mb for t, mb in memory if t >= args.seconds / 2)
        report["growth"] = round(report["rss_end_mb"] / report["rss_start_mb"] - 1, 3)   # from idle
        report["growth_second_half"] = round(report["rss_end_mb"] / half - 1, 3)   # sessions all open: a leak's share
    print(json.dumps({k: v for k, v in report.items() if k not in ("latency_ms_per_client", "rss_mb_over_time")},
                     indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
