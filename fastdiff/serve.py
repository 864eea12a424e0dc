"""The real-time demo on Ray Serve: one model per replica, sessions pinned to the replica that took
their WebSocket, autoscaling on ongoing sessions, replicas that die brought back by Ray.

    fastdiff serve --replicas 2                                   # a local Ray instance
    fastdiff serve --min-replicas 1 --max-replicas 8 --address auto   # join a running cluster

The app is the demo's own (:func:`fastdiff.demo.create_app`): the page, ``/ws``, ``/health`` and
``/stats`` are the same code, built on each replica by Ray Serve's ASGI builder. What Ray adds:

- ``ray_actor_options`` asks for one GPU per replica when CUDA is there, a CPU otherwise;
- each replica keeps its own session limit (``DemoConfig.max_sessions``) and refuses a session
  beyond it clearly, as the plain demo does; Ray's router sends a new WebSocket (one ongoing request
  for its whole life) to the less busy of two replicas, so a session is refused only when the
  replicas it was offered are full; ``max_ongoing_requests`` leaves room above the sessions for
  ``/health`` and ``/stats``;
- autoscaling follows ongoing sessions (``target_sessions`` per replica, between min and max);
- every replica reports its statistics to one :class:`StatsBoard` actor each second; any replica's
  ``/stats`` shows every replica's and their total;
- a replica that dies closes its own clients' WebSockets (the page reconnects by itself, to a live
  replica, and says how many frames in flight were lost); the others' sessions go on; Ray's Serve
  controller starts a replica in its place.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

__all__ = ["StatsBoard", "build_application", "serve", "BOARD_NAME", "DEPLOYMENT_NAME", "APP_NAME"]

BOARD_NAME = "fastdiff-stats"
DEPLOYMENT_NAME = "fastdiff-demo"
APP_NAME = "fastdiff"
REPORT_EVERY_S = 1.0
STALE_AFTER_S = 5.0   # a replica that has not reported for this long is gone
HTTP_HEADROOM = 8     # ongoing HTTP requests a replica takes beside its sessions


def _ray():
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError as error:
        raise ImportError('fastdiff serve needs Ray Serve: pip install "fastdiff[serve]"') from error
    return ray, ray_serve


class StatsBoard:
    """What each replica last reported, and their total (a Ray actor: one per application)."""

    def __init__(self):
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, snapshot: dict) -> None:
        self.reports[replica] = (time.time(), snapshot)

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def view(self) -> dict:
        now = time.time()
        live = {r: s for r, (t, s) in self.reports.items() if now - t < STALE_AFTER_S}
        total = {k: sum(s.get(k) or 0 for s in live.values())
                 for k in ("sessions", "max_sessions", "outputs", "dropped", "errors")}
        total["frames_per_s"] = round(sum(s.get("frames_per_s") or 0 for s in live.values()), 2)
        # percentiles do not add up: the worst replica's, and the session-weighted mean of the medians
        p95 = [s["latency_p95_ms"] for s in live.values() if s.get("latency_p95_ms") is not None]
        total["latency_p95_ms_worst"] = max(p95) if p95 else None
        weights = [(s.get("outputs") or 0, s.get("latency_p50_ms")) for s in live.values()
                   if s.get("latency_p50_ms") is not None]
        outputs = sum(w for w, _ in weights)
        total["latency_p50_ms_mean"] = round(sum(w * v for w, v in weights) / outputs, 2) if outputs else None
        total["replicas"] = len(live)
        return {"replicas": live, "total": total}


def _board():
    ray, _ = _ray()
    return ray.get_actor(BOARD_NAME, namespace="serve")


def _app_builder(model: str, config, device: str | None):
    """What each replica runs at start: load the model, build the demo's app, report its stats."""

    def build():
        from ray import serve as ray_serve

        from .demo import create_app
        from .models import load_model

        replica = ray_serve.get_replica_context().replica_id.unique_id
        import torch

        pipe = load_model(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        board = _board()
        app = create_app(pipe, config, replica=replica, cluster=lambda: _ray()[0].get(board.view.remote()))

        def report():   # every second, for as long as the replica lives
            while True:
                try:
                    board.report.remote(replica, app.state.snapshot())
                except Exception:  # noqa: BLE001 - the board may be restarting; try again next time
                    pass
                time.sleep(REPORT_EVERY_S)

        threading.Thread(target=report, name="fastdiff-stats-report", daemon=True).start()
        return app
    return build


def build_application(model: str = "shapes", config=None, *, replicas: int | None = None, min_replicas: int = 1,
                      max_replicas: int | None = None, target_sessions: float | None = None,
                      device: str | None = None, num_cpus: float = 1.0):
    """The Ray Serve application of the demo: `replicas` fixed, or autoscaling between
    `min_replicas` and `max_replicas` on `target_sessions` ongoing sessions per replica."""
    import torch

    from .checks import check_int, check_number
    from .demo import DemoConfig

    _, ray_serve = _ray()
    config = config or DemoConfig()
    check_int(replicas, "replicas", 1, optional=True)
    check_int(min_replicas, "min_replicas", 0)
    check_int(max_replicas, "max_replicas", max(1, min_replicas), optional=True)
    try:
        torch_device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    target = check_number(target_sessions if target_sessions is not None else max(1, config.max_sessions * 0.75),
                          "target_sessions", 0.0, low_open=True)
    gpu = torch_device.type == "cuda" if torch_device is not None else torch.cuda.is_available()
    # sessions are the replica's to limit (a full one refuses clearly, as the plain demo does); the
    # headroom lets /health and /stats through to a replica whose sessions are all taken
    options = dict(name=DEPLOYMENT_NAME, max_ongoing_requests=config.max_sessions + HTTP_HEADROOM,
                   ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": num_cpus},
                   health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    if replicas is not None and max_replicas is None:
        options["num_replicas"] = replicas
    else:
        most = max_replicas or max(8, min_replicas)   # the default ceiling, raised to a larger floor
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": most,
                                         "target_ongoing_requests": target, "upscale_delay_s": 2,
                                         "downscale_delay_s": 60,
                                         "initial_replicas": replicas or max(1, min_replicas)}
    # Ray Serve's ASGI builder: the app is built on each replica, where the model is
    demo = ray_serve.ingress(_app_builder(model, config, device))()
    return ray_serve.deployment(**options)(demo).bind()


def start_board():
    """The statistics board actor, named so that every replica finds it (created once)."""
    ray, _ = _ray()
    try:
        return _board()
    except ValueError:
        return ray.remote(StatsBoard).options(name=BOARD_NAME, namespace="serve", lifetime="detached",
                                              num_cpus=0).remote()


def serve(model: str = "shapes", config=None, *, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, block: bool = True, **scaling):
    """Start Ray (or join `address`), the statistics board and the application; serve until
    interrupted when `block`. Returns the application's base URL."""
    ray, ray_serve = _ray()
    application = build_application(model, config, **scaling)   # its arguments checked before Ray starts
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False, namespace="serve",
                 log_to_driver=False, **({} if address else {"num_cpus": max(2, os.cpu_count() or 2)}))
    ray_serve.start(http_options={"host": host, "port": port}, detached=False)
    start_board()
    ray_serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            ray_serve.shutdown()
    return url


def replica_actors() -> dict:
    """{replica id: actor} of the application's replicas (for the kill test and operators)."""
    ray, _ = _ray()
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith("SERVE_REPLICA") and f"#{DEPLOYMENT_NAME}#" in name:
            namespace = entry.get("namespace", "serve") if isinstance(entry, dict) else "serve"
            try:
                found[name.rsplit("#", 1)[-1]] = ray.get_actor(name, namespace=namespace)
            except ValueError:   # gone meanwhile
                continue
    return found


def config_with(config, **changes):
    """A :class:`fastdiff.demo.DemoConfig` with `changes` (for the command line)."""
    return dataclasses.replace(config, **changes)


def kuberay_app(args: dict):
    """The application for a RayService's ``serveConfigV2`` (``import_path: fastdiff.serve:kuberay_app``)
    or ``serve run fastdiff.serve:kuberay_app model=shapes``; `args` are strings: ``model``,
    ``max_sessions``, ``cfg``, ``min_replicas``, ``max_replicas``, ``target_sessions``."""
    from .demo import DemoConfig

    start_board()
    config = DemoConfig(max_sessions=int(args.get("max_sessions", 4)), cfg=args.get("cfg", "self"))
    target = args.get("target_sessions")
    return build_application(args.get("model", "shapes"), config, min_replicas=int(args.get("min_replicas", 1)),
                             max_replicas=int(args.get("max_replicas", 8)),
                             target_sessions=float(target) if target is not None else None)
