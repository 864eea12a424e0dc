"""The demo server under fuzzing and a small soak, on loopback: every malformed message gets an error
reply, the session stays usable, the server never falls over, and every frame is answered."""

import io
import json
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the demo extra (fastapi, uvicorn, websockets) is not installed")
from websockets.sync.client import connect  # noqa: E402

from fastdiff.architectures import tiny_sd_pipeline  # noqa: E402
from fastdiff.demo import DemoConfig, create_app, serve_in_thread  # noqa: E402
from fastdiff.shapes import moving_shapes_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.soak import main  # noqa: E402

MAX_MESSAGE_BYTES = 32 * 1024
MAX_FRAME_SIDE = 128
RECV_TIMEOUT_S = 120   # a guard against a hung server on a busy machine, not a speed requirement


@pytest.fixture(scope="module")
def server():
    import torch

    torch.set_num_threads(1)
    pipe = tiny_sd_pipeline(scheduler="lcm")
    config = DemoConfig(max_sessions=12, max_message_bytes=MAX_MESSAGE_BYTES, max_frame_side=MAX_FRAME_SIDE,
                        threads=1, steps=(40,))
    with serve_in_thread(create_app(pipe, config), config) as url:
        yield url


def jpeg(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def malformed(rng: random.Random) -> tuple[str, object]:
    """One malformed message of a random kind: (kind, text or bytes)."""
    frame = jpeg(moving_shapes_clip(num_frames=1, seed=rng.randrange(99))[0])
    kinds = {
        "bad json": lambda: rng.choice(["{", "not json", '{"type": "start"', "}{", "[1, 2", '{"type": NaN}']),
        "not an object": lambda: rng.choice(["[]", "null", "123", '"start"', "true"]),
        "unknown type": lambda: json.dumps({"type": rng.choice(["go", "", "STOP", 5, None, [], {}])}),
        "unknown field": lambda: json.dumps({"type": rng.choice(["start", "update"]), f"field{rng.randrange(9)}": 1}),
        "wrong type": lambda: json.dumps({"type": "start", **rng.choice([
            {"guidance_scale": "high"}, {"steps": "32,45"}, {"steps": [1.5]}, {"prompt": 123}, {"mode": 1},
            {"format": "gif"}, {"negative_prompt": ["a"]}, {"steps": [True]}, {"prompt": None}])}),
        "huge number": lambda: json.dumps({"type": "start", **rng.choice([
            {"guidance_scale": 1e308}, {"guidance_scale": -1e30}, {"steps": [10 ** 30]}, {"steps": list(range(50))},
            {"prompt": "a" * 10_000}])}),
        "update before start": lambda: json.dumps({"type": "update", "prompt": "a red circle"}),
        "truncated image": lambda: frame[:rng.randrange(10, len(frame) - 10)],
        "random bytes": lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))),
        "oversized image": lambda: jpeg(Image.new("RGB", (MAX_FRAME_SIDE + rng.randrange(1, 64), 32))),
        "tiny image": lambda: jpeg(Image.new("RGB", (rng.randrange(1, 16), 20))),
        "oversized message": lambda: rng.choice(["x" * (MAX_MESSAGE_BYTES + 1), b"\xff" * (MAX_MESSAGE_BYTES + 5)]),
        "frame before start": lambda: frame,
        "json as binary": lambda: json.dumps({"type": "start"}).encode(),
        "png frame": lambda: (lambda b: (Image.new("RGB", (32, 32)).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
    }
    kind = rng.choice(sorted(kinds))
    return kind, kinds[kind]()


def next_json(ws):
    while True:
        message = ws.recv(timeout=RECV_TIMEOUT_S)
        if not isinstance(message, bytes):
            return json.loads(message)


def test_a_thousand_malformed_messages_each_get_an_error_and_the_session_lives_on(server):
    rng = random.Random(0)
    url = server.replace("http://", "ws://") + "/ws"
    kinds = set()
    with connect(url, max_size=None) as ws:
        assert next_json(ws)["type"] == "ready"
        for i in range(1000):
            kind, message = malformed(rng)
            kinds.add(kind)
            ws.send(message)
            reply = next_json(ws)
            assert reply["type"] == "error", (i, kind, reply)
            assert reply["message"]
        assert len(kinds) >= 14   # every kind was tried
        # a flood of control messages: every one is answered (accepted, or refused as too many)
        ws.send(json.dumps({"type": "start", "prompt": "a red circle", "mode": "img2img"}))
        assert next_json(ws)["type"] == "started"
        for _ in range(60):
            ws.send(json.dumps({"type": "update", "guidance_scale": 1.5}))
        replies = [next_json(ws)["type"] for _ in range(60)]
        assert set(replies) <= {"updated", "error"} and len(replies) == 60
        # and the session still works: a real frame gets its output
        frame = jpeg(moving_shapes_clip(num_frames=1, seed=3)[0])
        ws.send(frame)
        while (reply := next_json(ws))["type"] != "output":
            assert reply["type"] in ("updated", "dropped"), reply
    import urllib.request

    with urllib.request.urlopen(server + "/health", timeout=RECV_TIMEOUT_S) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_a_small_soak_answers_every_frame(tmp_path):
    """The soak benchmark's own run, small: its server in a process of its own, its memory sampled."""
    out = tmp_path / "soak.json"
    main(["--clients", "8", "--max-sessions", "6", "--seconds", "4", "--seed", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["crashes"] == 0 and report["unanswered"] == 0, report
    assert report["frames_sent"] > 0 and report["outputs"] > 0 and report["dropped"] > 0   # the floods
    assert report["session_limit"] == 6 and report["most_sessions_seen"] <= 6
    assert report["oversize_sent"] > 0 and report["oversize_refused"] == report["oversize_sent"]   # the caps held
    memory = [mb for _, mb in report["rss_mb_over_time"]]
    assert len(memory) >= 4 and all(mb > 50 for mb in memory)   # a torch server's resident memory, once a second
    assert report["rss_idle_mb"] <= report["rss_start_mb"] and report["growth"] == pytest.approx(
        report["rss_end_mb"] / report["rss_start_mb"] - 1, abs=1e-3)


def test_freed_memory_is_returned_at_most_so_often(monkeypatch):
    from fastdiff.demo import memory

    if memory._TRIM is None:
        pytest.skip("not glibc: there is no malloc_trim to call")
    monkeypatch.setattr(memory, "_last", float("-inf"))   # restored after: the server's own trims go on
    assert memory.release_free_memory(now=1e9) is True
    assert memory.release_free_memory(now=1e9 + memory.MIN_INTERVAL_S / 2) is False   # too soon
    assert memory.release_free_memory(now=1e9 + memory.MIN_INTERVAL_S) is True
