"""The demo on Ray Serve under load, on loopback: 1 against 2 replicas at the same client load, Ray
Serve's proxy against the plain demo server (one client, so that no queue hides it), and one replica killed while 4 clients stream.

    python benchmarks/serve_load.py [--model shapes|tiny] [--clients 4] [--seconds 20] [--out out/serve_load.json]

Each client streams img2img frames of the model (the app's default, the embedded shapes model, or the
tiny pipeline, whose frames are so cheap that the proxy and the clients weigh more), keeping the
stream's lag + 1 frames in flight as the page does, and counts outputs; a client whose connection
drops reconnects at once and counts the frames it had in flight as lost. One torch thread per replica (and for the plain server).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import environment  # noqa: E402


def _frames():
    from fastdiff.shapes import moving_shapes_clip

    out = []
    for image in moving_shapes_clip(num_frames=8, seed=0):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


class Client(threading.Thread):
    def __init__(self, url, frames, stop):
        super().__init__(daemon=True)
        self.url, self.frames, self.stop = url, frames, stop
        self.outputs, self.dropped, self.lost, self.latencies, self.reconnects = 0, 0, 0, [], []
        self.replicas = []
        self.dropped_at = None

    def run(self):
        from websockets.sync.client import connect

        while not self.stop.is_set():
            pending = ()
            try:
                with connect(self.url, open_timeout=60, max_size=None) as ws:
                    ready = json.loads(ws.recv(timeout=60))
                    if ready.get("type") != "ready":
                        time.sleep(0.2)
                        continue
                    self.replicas.append(ready.get("replica"))
                    if self.dropped_at is not None:
                        self.reconnects.append(time.monotonic() - self.dropped_at)
                    ws.send(json.dumps({"type": "start", "mode": "img2img", "prompt": "a red circle"}))
                    lag = 0
                    while True:
                        started = json.loads(ws.recv(timeout=60))
                        if started.get("type") == "started":
                            lag = started.get("lag", 0)
                            break
                    pending = collections.deque()   # send times of the frames in flight, oldest first
                    i = 0
                    while not self.stop.is_set():
                        while len(pending) <= lag:   # lag + 1 frames in flight, as the page keeps them
                            pending.append(time.perf_counter())
                            ws.send(self.frames[i % len(self.frames)])
                            i += 1
                        message = ws.recv(timeout=60)
                        if isinstance(message, bytes):
                            continue
                        reply = json.loads(message)
                        if reply["type"] in ("output", "dropped"):
                            sent = pending.popleft()
                        if reply["type"] == "output":
                            self.outputs += 1
                            self.latencies.append(time.perf_counter() - sent)
                            if self.dropped_at is not None and len(self.reconnects) == len(self.replicas) - 1:
                                self.dropped_at = None
                        elif reply["type"] == "dropped":
                            self.dropped += 1
            except Exception:  # noqa: BLE001 - the connection dropped (a replica died): reconnect
                self.lost += len(pending)
                self.dropped_at = time.monotonic()
                time.sleep(0.1)


def load(url: str, clients: int, seconds: float, on_midway=None) -> dict:
    import numpy as np

    frames = _frames()
    stop = threading.Event()
    crew = [Client(url.replace("http://", "ws://") + "/ws", frames, stop) for _ in range(clients)]
    for c in crew:
        c.start()
    time.sleep(2)   # past the first frames
    counted = sum(c.outputs for c in crew)
    start = time.monotonic()
    if on_midway:
        time.sleep(seconds / 2)
        on_midway()
        time.sleep(seconds / 2)
    else:
        time.sleep(seconds)
    elapsed = time.monotonic() - start
    done = sum(c.outputs for c in crew) - counted
    stop.set()
    for c in crew:
        c.join(90)
    latencies = [v for c in crew for v in c.latencies]
    p50, p95 = (float(x) * 1000 for x in np.percentile(latencies, [50, 95])) if latencies else (float("nan"),) * 2
    return {"clients": clients, "outputs_per_s": done / elapsed, "latency_p50_ms": p50, "latency_p95_ms": p95,
            "lost_frames": sum(c.lost for c in crew), "dropped_frames": sum(c.dropped for c in crew), "reconnect_s": [r for c in crew for r in c.reconnects],
            "replicas_seen": sorted({r for c in crew for r in c.replicas if r})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("shapes", "tiny"), default="shapes")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", default="out/serve_load.json")
    args = parser.parse_args(argv)
    import torch

    from fastdiff.demo import DemoConfig, create_app, serve_in_thread
    from fastdiff.models import load_model

    torch.set_num_threads(1)
    # the tiny pipeline's LCM takes one step; the shapes model keeps the stream's default steps
    config = DemoConfig(max_sessions=args.clients, threads=1, steps=(40,) if args.model == "tiny" else None)
    report = {"environment": environment(["benchmarks/serve_load.py", *(argv or sys.argv[1:])], ("torch", "ray"))}
    with serve_in_thread(create_app(load_model(args.model), config), config) as url:
        report["plain demo, 1 process"] = load(url, args.clients, args.seconds)
        report["plain demo, 1 client"] = load(url, 1, args.seconds)
    from ray import serve as ray_serve

    from fastdiff import serve

    for replicas, port in ((1, 8601), (2, 8602)):
        url = serve.serve(args.model, config, port=port, block=False, replicas=replicas)
        while len(serve.replica_actors()) < replicas:
            time.sleep(0.5)
        report[f"Ray Serve, {replicas} replica(s)"] = load(url, args.clients, args.seconds)
        if replicas == 1:   # the proxy's latency, unloaded: one client, as against the plain server
            report["Ray Serve, 1 replica, 1 client"] = load(url, 1, args.seconds)
        if replicas == 2:   # the kill test: one replica killed midway through
            import ray

            def kill():
                victim = next(iter(serve.replica_actors().values()))
                report["killed_at"] = time.time()
                ray.kill(victim, no_restart=False)
            report["kill test, 2 replicas"] = load(url, args.clients, args.seconds, on_midway=kill)
        ray_serve.delete(serve.APP_NAME)
        ray_serve.shutdown()
    one, two = report["Ray Serve, 1 replica(s)"], report["Ray Serve, 2 replica(s)"]
    report["model"] = args.model
    report["2 replicas / 1 replica"] = two["outputs_per_s"] / one["outputs_per_s"]
    plain, proxied = report["plain demo, 1 client"], report["Ray Serve, 1 replica, 1 client"]
    for q in ("p50", "p95"):
        report[f"proxy overhead {q} ms"] = proxied[f"latency_{q}_ms"] - plain[f"latency_{q}_ms"]
    print(json.dumps({k: v for k, v in report.items() if k != "environment"}, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
