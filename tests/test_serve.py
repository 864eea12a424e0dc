"""The demo on Ray Serve, on a local Ray instance started once for this module: two replicas of the
tiny pipeline, sessions spread and pinned, the cluster's session limit, a replica killed, /stats."""

import json
import time
import urllib.request

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e \".[serve]\")")
from websockets.sync.client import connect  # noqa: E402

from fastdiff.demo import DemoConfig  # noqa: E402
from fastdiff.shapes import moving_shapes_clip  # noqa: E402

PORT = 8431
TIMEOUT_S = 180   # a guard against a hung cluster on a busy machine, not a speed requirement


@pytest.fixture(scope="module")
def cluster():
    from ray import serve as ray_serve

    from fastdiff import serve

    config = DemoConfig(max_sessions=1, threads=1, steps=(40,), max_frame_side=128)
    url = serve.serve("tiny", config, port=PORT, block=False, replicas=2, num_cpus=0.5)
    _wait_for(lambda: len(serve.replica_actors()) == 2)
    yield url
    ray_serve.shutdown()
    import ray

    ray.shutdown()


def _wait_for(condition, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never came true")
        time.sleep(0.5)


def _json(ws):
    while True:
        message = ws.recv(timeout=TIMEOUT_S)
        if not isinstance(message, bytes):
            return json.loads(message)


def _frame(seed=0):
    import io

    buffer = io.BytesIO()
    moving_shapes_clip(num_frames=1, seed=seed)[0].save(buffer, format="JPEG")
    return buffer.getvalue()


def _session(url):
    ws = connect(url.replace("http://", "ws://") + "/ws", open_timeout=TIMEOUT_S, max_size=None).__enter__()
    return ws, _json(ws)


def _outputs(ws, frames):
    """Send `frames` one after another; the output indices, in the order they came."""
    indices = []
    for i, frame in enumerate(frames):
        ws.send(frame)
        while (message := _json(ws))["type"] != "output":
            assert message["type"] in ("started", "updated", "dropped"), message
        indices.append(message["index"])
    return indices


def test_two_replicas_serve_two_clients_and_the_cluster_refuses_a_third(cluster):
    a, ready_a = _session(cluster)
    b, ready_b = _session(cluster)
    try:
        assert ready_a["type"] == ready_b["type"] == "ready"
        assert ready_a["replica"] != ready_b["replica"]   # spread over both, one session each
        for ws in (a, b):
            ws.send(json.dumps({"type": "start", "mode": "img2img", "prompt": "a red circle"}))
        frames = [_frame(seed) for seed in range(4)]
        assert _outputs(a, frames) == [0, 1, 2, 3] and _outputs(b, frames) == [0, 1, 2, 3]   # in order
        c, refused = _session(cluster)   # every replica full: refused clearly, as the plain demo refuses
        assert refused["type"] == "error" and refused["field"] == "session"
        c.close()

        def stats():
            with urllib.request.urlopen(cluster + "/stats", timeout=TIMEOUT_S) as response:
                return json.loads(response.read())
        # replicas report once a second: wait for the reports that know of both sessions
        _wait_for(lambda: stats()["total"]["sessions"] == 2 and stats()["total"]["outputs"] >= 8)
        stats = stats()
        assert set(stats["replicas"]) == {ready_a["replica"], ready_b["replica"]}
        assert stats["total"]["sessions"] == sum(r["sessions"] for r in stats["replicas"].values()) == 2
        assert stats["total"]["outputs"] == sum(r["outputs"] for r in stats["replicas"].values()) >= 8
    finally:
        a.close()
        b.close()


def test_bad_input_is_answered_as_the_plain_demo_answers_it(cluster):
    ws, ready = _session(cluster)
    try:
        for message, field in (("{", None), (json.dumps({"type": "go"}), "type"), (b"not an image", "frame"),
                               (json.dumps({"type": "start", "guidance_scale": 99}), "guidance_scale")):
            ws.send(message)
            reply = _json(ws)
            assert reply["type"] == "error" and reply["field"] == field, reply
    finally:
        ws.close()


def test_a_killed_replica_closes_only_its_sessions_and_they_reconnect(cluster):
    import ray

    from fastdiff import serve

    _wait_for(lambda: len(serve.replica_actors()) == 2)
    a, ready_a = _session(cluster)
    b, ready_b = _session(cluster)
    try:
        for ws in (a, b):
            ws.send(json.dumps({"type": "start", "mode": "img2img", "prompt": "a red circle"}))
        assert _outputs(a, [_frame(0)]) == [0] and _outputs(b, [_frame(1)]) == [0]
        victim = serve.replica_actors()[ready_a["replica"]]
        ray.kill(victim, no_restart=False)
        with pytest.raises(Exception):   # its client's connection closes
            for _ in range(10):
                a.send(_frame(2))
                _json(a)
        assert _outputs(b, [_frame(3), _frame(4)]) == [1, 2]   # the other replica's session did not notice
        # the page reconnects by itself; here, by hand: a live replica takes the session
        _wait_for(lambda: len(serve.replica_actors()) == 2)   # and Ray brought the dead one back
        b.close()
        again, ready = _session(cluster)
        assert ready["type"] == "ready"
        again.send(json.dumps({"type": "start", "mode": "img2img", "prompt": "a red circle"}))
        assert _outputs(again, [_frame(5)]) == [0]
        again.close()
    finally:
        a.close()
        b.close()


def test_the_application_autoscales_on_sessions_or_keeps_its_replicas():
    """What `fastdiff serve` asks of Ray Serve (no cluster needed to build it)."""
    from fastdiff import serve

    config = DemoConfig(max_sessions=4)
    scaled = serve.build_application("tiny", config, min_replicas=1, max_replicas=4, target_sessions=2,
                                     device="cpu")._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 2)
    assert scaled.ray_actor_options["num_cpus"] == 1.0 and "num_gpus" not in scaled.ray_actor_options
    assert scaled.max_ongoing_requests > config.max_sessions   # room for /health and /stats on a full replica
    fixed = serve.build_application("tiny", config, replicas=3, device="cuda")._bound_deployment
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_gpus"] == 1
    with pytest.raises(ValueError, match="max_replicas"):
        serve.build_application("tiny", config, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target_sessions"):
        serve.build_application("tiny", config, max_replicas=2, target_sessions=0)
    with pytest.raises(ValueError, match="device"):
        serve.build_application("tiny", config, device="bogus")
    floor = serve.build_application("tiny", config, min_replicas=9, device="cpu")._bound_deployment
    assert floor._deployment_config.autoscaling_config.max_replicas == 9   # the default ceiling of 8 raised


def test_a_kuberay_rayservice_manifest_runs_the_same_application():
    import os

    import yaml

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos", "kuberay",
                        "rayservice.yaml")
    manifest = yaml.safe_load(open(path))
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    spec = manifest["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "fastdiff.serve:kuberay_app" and app["route_prefix"] == "/"
    (deployment,) = app["deployments"]
    assert deployment["name"] == "fastdiff-demo" and "autoscaling_config" in deployment
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] is not None and head["template"]["spec"]["containers"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
