"""Load on the demo server: N concurrent WebSocket clients on loopback for a fixed time.

Starts `fastdiff demo` as a subprocess on 127.0.0.1, then for each client count runs that many
clients at once, each behaving like the demo page: img2img on moving-shape JPEG frames, at most
--fps frames/s and at most lag + --window frames unanswered. Reports, per client count: outputs/s over all
clients, latency p50/p95 as a client sees it (frame sent → its output received, which includes the
stream's lag of n − 1 frames), frames the server dropped as stale, errors, and the server's resident
memory before the first round and after each round.

    python benchmarks/demo_load.py [--clients 1,2,4] [--seconds 20] [--fps 30] [--window 1] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request

import numpy as np
from websockets.asyncio.client import connect

from fastdiff.shapes import moving_shapes_clip

HOST = "127.0.0.1"  # loopback only


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def start_server(port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "fastdiff", "demo", "--host", HOST, "--port", str(port),
               "--max-sessions", str(max(args.clients)), "--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            get_json(f"http://{HOST}:{port}/health")
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def jpeg_frames(count: int = 64, size: int = 128) -> list[bytes]:
    frames = []
    for image in moving_shapes_clip(num_frames=count, size=size, seed=1):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        frames.append(buffer.getvalue())
    return frames


async def client(url: str, frames: list[bytes], seconds: float, fps: float, window: int) -> dict:
    """One page-like client; its outputs, drops, errors and latencies."""
    sent_at: dict[int, float] = {}
    latencies, counts = [], {"outputs": 0, "dropped": 0, "errors": 0}
    answered = asyncio.Event()
    state = {"lag": 1, "unanswered": 0, "stopped": asyncio.Event()}

    async with connect(url, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "start", "mode": "img2img"}))

        async def receive():
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                message = json.loads(message)
                kind = message["type"]
                if kind == "started":
                    state["lag"] = message["lag"]
                elif kind == "stopped":
                    state["stopped"].set()
                    return
                elif kind in ("output", "dropped", "error"):
                    key = {"output": "outputs", "dropped": "dropped", "error": "errors"}[kind]
                    counts[key] += 1
                    if kind == "output":
                        latencies.append(time.perf_counter() - sent_at.pop(message["index"]))
                    state["unanswered"] -= 1
                    answered.set()

        receiver = asyncio.create_task(receive())
        end, index = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            if state["unanswered"] > state["lag"] + window - 1:  # frames in flight, as the page keeps them
                answered.clear()
                try:
                    await asyncio.wait_for(answered.wait(), timeout=max(0.0, end - time.perf_counter()))
                except asyncio.TimeoutError:
                    break
                continue
            sent_at[index] = time.perf_counter()
            state["unanswered"] += 1
            await ws.send(frames[index % len(frames)])
            index += 1
            await asyncio.sleep(1 / fps)
        await ws.send(json.dumps({"type": "stop"}))  # the frames in flight come back before "stopped"
        await asyncio.wait_for(state["stopped"].wait(), timeout=60)
        await receiver
    return {"sent": index, **counts, "latencies": latencies}


async def round_of(url: str, clients: int, frames, seconds: float, fps: float, window: int) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(*(client(url, frames, seconds, fps, window) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies = np.array([x for r in results for x in r["latencies"]]) * 1000
    total = {key: sum(r[key] for r in results) for key in ("sent", "outputs", "dropped", "errors")}
    assert total["outputs"] + total["dropped"] + total["errors"] == total["sent"], "a frame went unanswered"
    return {"clients": clients, "seconds": round(elapsed, 1), **total,
            "outputs_per_s": round(total["outputs"] / elapsed, 2),
            "per_client_outputs_per_s": round(total["outputs"] / elapsed / clients, 2),
            "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
            "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies.size else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4", help="comma-separated client counts, one round each")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each round")
    parser.add_argument("--fps", type=float, default=30.0, help="most frames/s a client sends (the page's rate)")
    parser.add_argument("--window", type=int, default=1,
                        help="frames a client keeps unanswered beyond the stream's lag (the page: 1)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (0: torch's default)")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if min(args.clients) < 1 or args.seconds <= 0 or args.fps <= 0 or args.window < 1:
        parser.error("--clients and --window must be ≥ 1, --seconds and --fps > 0")

    server = start_server(args.port, args)
    try:
        memory = {"start_mib": round(rss_mib(server.pid), 1)}
        frames, url = jpeg_frames(), f"ws://{HOST}:{args.port}/ws"
        rows = []
        for clients in args.clients:
            rows.append(asyncio.run(round_of(url, clients, frames, args.seconds, args.fps, args.window)))
            rows[-1]["server_rss_mib"] = round(rss_mib(server.pid), 1)
            print(json.dumps(rows[-1]), flush=True)
        memory["end_mib"] = rows[-1]["server_rss_mib"]
        server_stats = get_json(f"http://{HOST}:{args.port}/stats")
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"\nserver memory (RSS): {memory['start_mib']} MiB at start, {memory['end_mib']} MiB at the end")
    print(f"server's own count: {server_stats['outputs']} outputs, {server_stats['dropped']} dropped, "
          f"{server_stats['errors']} errors\n")
    print("| clients | outputs/s (all) | per client | latency p50 / p95 ms | sent | outputs | dropped | errors | server RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['outputs_per_s']} | {r['per_client_outputs_per_s']} | "
              f"{r['latency_p50_ms']} / {r['latency_p95_ms']} | {r['sent']} | {r['outputs']} | {r['dropped']} | "
              f"{r['errors']} | {r['server_rss_mib']} |")
    if args.out:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "machine": machine, "memory": memory, "rows": rows,
                       "server_stats": server_stats}, f, indent=2)


if __name__ == "__main__":
    main()
