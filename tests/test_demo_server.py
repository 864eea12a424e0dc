"""The demo server over a real WebSocket on loopback, with the embedded shapes model."""

import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the demo extra (fastapi, uvicorn, websockets) is not installed")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from fastdiff.demo import DemoConfig, create_app, serve_in_thread  # noqa: E402
from fastdiff.demo.inbox import MAX_PENDING_CONTROLS, Frame, Inbox  # noqa: E402
from fastdiff.demo.messages import ClientError, parse_control  # noqa: E402
from fastdiff.demo.stats import FrameStats  # noqa: E402
from fastdiff.shapes import moving_shapes_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_MESSAGE_BYTES = 64 * 1024
MAX_FRAME_SIDE = 256
RECV_TIMEOUT_S = 60  # a guard against a hung server, not a speed requirement


@pytest.fixture(scope="module")
def shapes_pipe():
    import torch

    from fastdiff.shapes.model import load_pipeline

    torch.set_num_threads(1)  # the test machine's other core may be busy
    return load_pipeline()


@pytest.fixture(scope="module")
def server(shapes_pipe):
    config = DemoConfig(max_sessions=2, max_message_bytes=MAX_MESSAGE_BYTES, max_frame_side=MAX_FRAME_SIDE, threads=1)
    with serve_in_thread(create_app(shapes_pipe, config), config) as url:
        yield url


def ws_url(server):
    return server.replace("http://", "ws://") + "/ws"


def get_json(server, path):
    with urllib.request.urlopen(server + path, timeout=RECV_TIMEOUT_S) as response:
        return json.loads(response.read())


def jpeg(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def frames(n, seed=0):
    return [jpeg(frame) for frame in moving_shapes_clip(num_frames=n, seed=seed)]


def receive(ws):
    """The next message: a dict for JSON, bytes for an image."""
    message = ws.recv(timeout=RECV_TIMEOUT_S)
    return message if isinstance(message, bytes) else json.loads(message)


def receive_until(ws, kind):
    """(every message before the first of type `kind`, that message); an output's image follows its header."""
    seen = []
    while True:
        message = receive(ws)
        if isinstance(message, dict) and message["type"] == kind:
            return seen, message
        seen.append(message)


def outputs_of(messages):
    """[(header, PIL image)] from a run of messages."""
    pairs = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message["type"] == "output":
            assert isinstance(messages[i + 1], bytes), "an output header must be followed by its image"
            pairs.append((message, Image.open(io.BytesIO(messages[i + 1]))))
    return pairs


@contextlib.contextmanager
def open_session(server, start=True, **settings):
    """A connected client, started with `settings` unless start=False."""
    with connect(ws_url(server), max_size=None) as ws:
        ready = receive(ws)
        assert ready["type"] == "ready"
        if start:
            ws.send(json.dumps({"type": "start", **settings}))
            started = receive(ws)
            assert started["type"] == "started", started
        yield ws


def run_paced(ws, payloads, lag, first_index=0):
    """Send frames no faster than they are processed (frame k+1 after output k−lag), then stop.

    A frame is only dropped when it finds another still waiting, so paced frames never are."""
    messages = []
    for k, payload in enumerate(payloads):
        if k > lag:
            seen, header = receive_until(ws, "output")
            messages += seen + [header, receive(ws)]
            assert header["index"] == first_index + k - lag - 1
        ws.send(payload)
    ws.send(json.dumps({"type": "stop"}))
    seen, _ = receive_until(ws, "stopped")
    return outputs_of(messages + seen)


def wait_for_sessions(server, count):
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while get_json(server, "/health")["sessions"] != count:
        assert time.monotonic() < deadline, f"the server still reports {get_json(server, '/health')['sessions']} sessions"
        time.sleep(0.05)


# -- endpoints -------------------------------------------------------------------------------------------
def test_page_health_and_stats(server):
    assert get_json(server, "/health")["status"] == "ok"
    stats = get_json(server, "/stats")
    assert {"sessions", "frames_per_s", "latency_p50_ms", "latency_p95_ms", "dropped", "outputs"} <= set(stats)
    with urllib.request.urlopen(server + "/", timeout=RECV_TIMEOUT_S) as response:
        page = response.read().decode()
    assert '<canvas id="input"' in page and '<img id="output"' in page and "/static/demo.js" in page
    with urllib.request.urlopen(server + "/static/demo.js", timeout=RECV_TIMEOUT_S) as response:
        assert b"new WebSocket" in response.read()


# -- frames ----------------------------------------------------------------------------------------------
def test_paced_frames_all_come_back_in_order(server):
    with open_session(server) as ws:
        pairs = run_paced(ws, frames(6), lag=1)
    assert [header["index"] for header, _ in pairs] == list(range(6))
    assert all(image.format == "JPEG" and image.size == (64, 64) for _, image in pairs)
    last = pairs[-1][0]["stats"]
    assert last["outputs"] == 6 and last["dropped"] == 0 and last["latency_p50_ms"] > 0


def test_a_burst_is_answered_by_outputs_or_counted_drops(server):
    n = 12
    with open_session(server) as ws:
        for payload in frames(n):
            ws.send(payload)
        ws.send(json.dumps({"type": "stop"}))
        messages, _ = receive_until(ws, "stopped")
    outputs = [header["index"] for header, _ in outputs_of(messages)]
    drops = [m for m in messages if isinstance(m, dict) and m["type"] == "dropped"]
    assert outputs == sorted(outputs)  # in input order
    assert sorted(outputs + [d["index"] for d in drops]) == list(range(n))  # each frame answered once
    assert outputs[-1] == n - 1  # the newest frame is never the stale one
    assert [d["dropped"] for d in drops] == list(range(1, len(drops) + 1))  # the running count


def test_webp_frames_in_and_webp_out(server):
    buffer = io.BytesIO()
    moving_shapes_clip(1)[0].save(buffer, format="WEBP")
    with open_session(server, format="webp") as ws:
        pairs = run_paced(ws, [buffer.getvalue()] * 3, lag=1)
    assert [image.format for _, image in pairs] == ["WEBP"] * 3


def test_img2img_outputs_follow_the_input(server):
    red, blue = (jpeg(Image.new("RGB", (64, 64), colour)) for colour in ((220, 30, 30), (30, 30, 220)))
    results = {}
    for name, payload in (("red", red), ("blue", blue)):
        with open_session(server) as ws:
            image = run_paced(ws, [payload] * 3, lag=1)[-1][1]
        results[name] = np.asarray(image.convert("RGB"), dtype=float)
    assert np.abs(results["red"] - results["blue"]).mean() > 10


# -- control messages ------------------------------------------------------------------------------------
def last_output_with(server, **settings):
    with open_session(server, **settings) as ws:
        return np.asarray(run_paced(ws, frames(4), lag=len(settings.get("steps", [32, 45])) - 1)[-1][1].convert("RGB"),
                          dtype=float)


def test_prompt_changes_the_output_and_the_same_settings_repeat_it(server):
    red = last_output_with(server, prompt="a large red square, green background", steps=[10, 45])
    again = last_output_with(server, prompt="a large red square, green background", steps=[10, 45])
    blue = last_output_with(server, prompt="a large blue circle, yellow background", steps=[10, 45])
    assert np.array_equal(red, again)
    assert np.abs(red - blue).mean() > 10


def test_txt2img_regenerates_when_the_prompt_changes(server):
    def next_image(ws):
        receive_until(ws, "output")
        return np.asarray(Image.open(io.BytesIO(receive(ws))).convert("RGB"), dtype=float)

    with open_session(server, mode="txt2img", prompt="a large red circle, blue background") as ws:
        before = next_image(ws)  # the stream fills, then one image comes out: lag + 1 calls
        ws.send(json.dumps({"type": "update", "prompt": "a large yellow square, green background"}))
        _, updated = receive_until(ws, "updated")
        assert updated["settings"]["prompt"] == "a large yellow square, green background" and updated["lag"] == 3
        # The images in flight take the new prompt at once; the 4th is generated with it all along.
        after = [next_image(ws) for _ in range(4)][-1]
    assert np.abs(before - after).mean() > 10
    assert before.std() > 5  # a picture, not a blank


def test_update_applies_and_replies_with_the_settings(server):
    with open_session(server) as ws:
        ws.send(json.dumps({"type": "update", "guidance_scale": 2.0, "steps": [20, 40, 45]}))
        _, updated = receive_until(ws, "updated")
    assert updated["settings"]["guidance_scale"] == 2.0 and updated["settings"]["steps"] == [20, 40, 45]
    assert updated["lag"] == 2


# -- bad input ---------------------------------------------------------------------------------------------
def png(size):
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


def claiming(side):
    """A small JPEG whose header claims a side × side picture (a decompression bomb's trick)."""
    data = bytearray(jpeg(Image.new("RGB", (64, 64))))
    start = data.find(b"\xff\xc0") + 5   # the baseline frame header: height, then width
    data[start:start + 4] = side.to_bytes(2, "big") * 2
    return bytes(data)


BAD_CONTROLS = [
    ("{not json", None),
    ("[1, 2]", None),
    ("[" * 5000 + "]" * 5000, None),   # deeper than the parser recurses
    ('{"type": "update", "prompt": "\\ud800"}', "prompt"),   # a lone surrogate no tokenizer takes
    ('{"type": "launch"}', "type"),
    ('{"type": "update", "colour": "red"}', "colour"),
    ('{"type": "update", "guidance_scale": "high"}', "guidance_scale"),
    ('{"type": "update", "guidance_scale": NaN}', None),
    ('{"type": "update", "guidance_scale": -1}', "guidance_scale"),
    ('{"type": "update", "steps": [1, 2, 3, 4, 5, 6, 7, 8, 9]}', "steps"),
    ('{"type": "update", "steps": [45, 10]}', "steps"),  # the stream's own check: noisiest first
    ('{"type": "update", "mode": "video"}', "mode"),
    ('{"type": "update", "prompt": 7}', "prompt"),
    ('{"type": "update", "prompt": "' + "red " * 80 + '"}', "prompt"),  # longer than the tokenizer takes
    ('{"type": "stop", "now": true}', "now"),
]

BAD_FRAMES = [
    (b"definitely not an image", "not a JPEG or WebP"),
    (png((64, 64)), "not a JPEG or WebP"),
    (jpeg(moving_shapes_clip(1)[0], quality=95)[:-300], "cannot be decoded"),  # truncated
    (jpeg(Image.new("RGB", (8, 8))), "between 16 and"),
    (jpeg(Image.new("RGB", (MAX_FRAME_SIDE + 1, 64))), "between 16 and"),
    (bytes(MAX_MESSAGE_BYTES + 1), "the limit is"),
    (claiming(15000), "claims a picture far larger"),
]


def test_each_malformed_message_gets_an_error_and_the_session_lives_on(server):
    with open_session(server) as ws:
        for text, field in BAD_CONTROLS:
            ws.send(text)
            error = receive(ws)
            assert error["type"] == "error" and error["field"] == field, (text, error)
        for index, (payload, expected) in enumerate(BAD_FRAMES):
            ws.send(payload)
            error = receive(ws)
            assert error["type"] == "error" and error["index"] == index and expected in error["message"], error
        # The session still works; the refused frames took the first indices.
        pairs = run_paced(ws, frames(3), lag=1, first_index=len(BAD_FRAMES))
        assert [header["index"] for header, _ in pairs] == [len(BAD_FRAMES) + k for k in range(3)]
        assert pairs[-1][0]["stats"]["errors"] == len(BAD_CONTROLS) + len(BAD_FRAMES)
    assert get_json(server, "/health")["status"] == "ok"


def test_messages_before_start_are_refused(server):
    with open_session(server, start=False) as ws:
        ws.send(frames(1)[0])
        assert "before start" in receive(ws)["message"]
        ws.send(json.dumps({"type": "update", "prompt": "a red circle"}))
        assert "before start" in receive(ws)["message"]


def test_frames_in_txt2img_mode_are_refused(server):
    with open_session(server, mode="txt2img") as ws:
        ws.send(frames(1)[0])
        _, error = receive_until(ws, "error")
    assert error["index"] == 0 and "txt2img" in error["message"]


def test_a_message_far_over_the_cap_closes_only_that_connection(server):
    with open_session(server) as ws:
        ws.send(bytes(5 * MAX_MESSAGE_BYTES))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                receive(ws)
    assert closed.value.rcvd.code == 1009  # message too big
    wait_for_sessions(server, 0)
    with open_session(server) as ws:
        assert len(run_paced(ws, frames(2), lag=1)) == 2


def test_a_page_from_another_origin_is_refused(server):
    with pytest.raises(InvalidStatus) as refused:
        with connect(ws_url(server), origin="http://elsewhere.example"):
            pass
    assert refused.value.response.status_code == 403
    with connect(ws_url(server), origin=server) as ws:  # the demo's own page
        assert receive(ws)["type"] == "ready"


# -- sessions ----------------------------------------------------------------------------------------------
def test_session_limit_and_disconnect_cleanup(server):
    wait_for_sessions(server, 0)
    with open_session(server) as first, open_session(server):
        assert get_json(server, "/stats")["sessions"] == 2
        with connect(ws_url(server)) as third:
            refusal = receive(third)
            assert refusal["type"] == "error" and refusal["field"] == "session" and "full" in refusal["message"]
            with pytest.raises(ConnectionClosed) as closed:
                receive(third)
            assert closed.value.rcvd.code == 1013
        # A client that vanishes mid-stream frees its session.
        for payload in frames(3):
            first.send(payload)
        first.close()
        wait_for_sessions(server, 1)
        with open_session(server) as replacement:
            assert len(run_paced(replacement, frames(2), lag=1)) == 2
    wait_for_sessions(server, 0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_clients_that_leave_before_their_answer_end_quietly(server):
    """A frame, then gone: the server's answer finds a closed socket, which ends that session
    without an error in the server's log (it used to raise inside the receive loop)."""
    errors = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "fastdiff.demo")]
    for logger in loggers:
        logger.addHandler(errors)
    try:
        wait_for_sessions(server, 0)
        for payload in frames(6):
            with open_session(server) as ws:
                ws.send(payload)   # and close at once, before its output
        wait_for_sessions(server, 0)
        with open_session(server) as ws:   # the server still works
            assert len(run_paced(ws, frames(2), lag=1)) == 2
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []


def test_a_send_to_a_closed_socket_raises_client_gone():
    import asyncio

    from fastdiff.demo.server import Client, ClientGone

    class ClosedSocket:
        async def send_json(self, message):
            raise RuntimeError('Cannot call "send" once a close message has been sent.')

        send_bytes = send_json

    client = Client(ClosedSocket(), FrameStats())
    with pytest.raises(ClientGone):
        asyncio.run(client.send({"type": "dropped", "index": 0, "dropped": 1}))


# -- pure parts ----------------------------------------------------------------------------------------------
def test_parse_control_keeps_only_checked_fields():
    control = parse_control('{"type": "start", "mode": "txt2img", "steps": [0, 45], "guidance_scale": 1}')
    assert control.kind == "start" and control.fields == {"mode": "txt2img", "steps": (0, 45), "guidance_scale": 1.0}
    with pytest.raises(ClientError, match="guidance_scale"):
        parse_control('{"type": "update", "guidance_scale": true}')


def test_a_cleared_negative_prompt_leaves_the_stream_and_no_frame_is_lost():
    import fastdiff
    from fastdiff.architectures import tiny_sd_pipeline
    from fastdiff.demo.session import Session, Settings

    pipe = tiny_sd_pipeline(scheduler="lcm", img2img=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, format="JPEG")

    def make_stream(settings):
        stream = fastdiff.Stream(pipe, [20, 40], cfg="full", guidance_scale=2.0, output_type="pil")
        stream.prepare(settings.prompt, settings.negative_prompt)
        return stream

    session = Session(make_stream, Settings("img2img", "a red circle", None, 2.0, None, "jpeg"))
    session.apply(parse_control('{"type": "start", "negative_prompt": "dark"}'))
    assert session.stream.negative_prompt == "dark"
    frame = Frame(0, Image.open(io.BytesIO(jpeg.getvalue())), 0.0)
    assert session.process(frame) == []   # in flight: the stream lags one call
    outputs, reply = session.apply(parse_control('{"type": "update", "negative_prompt": null}'))
    assert session.stream.negative_prompt is None and reply["settings"]["negative_prompt"] is None
    assert [o.index for o in outputs] == [0]   # the frame in flight came back before the new stream


def test_inbox_keeps_the_newest_frame_and_every_control_in_order():
    inbox = Inbox()
    old, new = Frame(0, None, 0.0), Frame(1, None, 0.0)
    control = parse_control('{"type": "stop"}')
    assert inbox.put_frame(old) is None
    inbox.put_control(control)
    assert inbox.put_frame(new) is old
    assert [inbox.pop(), inbox.pop(), inbox.pop()] == [control, new, None]


def test_inbox_bounds_the_control_messages_waiting():
    inbox = Inbox()
    for _ in range(MAX_PENDING_CONTROLS):
        inbox.put_control(parse_control('{"type": "stop"}'))
    with pytest.raises(ClientError, match="already waiting"):
        inbox.put_control(parse_control('{"type": "stop"}'))


def test_frame_stats_rate_and_percentiles():
    now = [0.0]
    stats = FrameStats(clock=lambda: now[0])
    for i in range(1, 11):  # ten outputs over 10 s, latencies 10..100 ms
        now[0] = float(i)
        stats.output(i / 100)
    stats.drop()
    snapshot = stats.snapshot()
    assert snapshot["frames_per_s"] == 1.0  # 5 outputs in the last 5 s
    assert snapshot["latency_p50_ms"] == 55.0 and snapshot["latency_p95_ms"] == 95.5
    assert (snapshot["outputs"], snapshot["dropped"], snapshot["errors"]) == (10, 1, 0)


# -- command line ----------------------------------------------------------------------------------------------
def test_demo_command_refuses_an_unknown_backend():
    from click.testing import CliRunner

    from fastdiff.cli import main

    result = CliRunner().invoke(main, ["demo", "--backend", "warp-drive", "--port", "1"])
    assert result.exit_code == 2 and "backend" in result.output and "warp-drive" in result.output
    for args, named in [(["--guidance-scale", "1e9"], "--guidance-scale"), (["--max-frame-side", "100000000"],
                                                                           "--max-frame-side")]:
        result = CliRunner().invoke(main, ["demo", "--port", "1", *args])   # limits a client is held to
        assert result.exit_code == 2 and named in result.output, result.output


def test_fastdiff_demo_serves_the_page(tmp_path):
    """The real front door: `python -m fastdiff demo` in a subprocess, on a free loopback port."""
    command = [sys.executable, "-m", "fastdiff", "demo", "--port", "0", "--threads", "1", "--max-sessions", "1"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    watchdog = threading.Timer(RECV_TIMEOUT_S, server.kill)  # a hung start ends the test, not the suite
    watchdog.start()
    match = None
    try:
        for line in server.stderr:  # uvicorn prints the port it bound
            if match := re.search(r"running on (http://127\.0\.0\.1:\d+)", line):
                break
        assert match, "the server ended without listening"
        url = match.group(1)
        assert get_json(url, "/health") == {"status": "ok", "sessions": 0, "max_sessions": 1}
        with open_session(url) as ws:
            assert len(run_paced(ws, frames(2), lag=1)) == 2
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=RECV_TIMEOUT_S)
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_python_dash_m_demos_realtime_has_the_demo_options():
    result = subprocess.run([sys.executable, "-m", "demos.realtime", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=RECV_TIMEOUT_S)
    assert result.returncode == 0 and "--max-sessions" in result.stdout and "127.0.0.1" in result.stdout
