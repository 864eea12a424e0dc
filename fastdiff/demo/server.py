"""The demo server: the page, `/health`, `/stats`, and a WebSocket per client at `/ws`.

One pipeline is shared by every session; its calls run on a single compute thread, so sessions
take turns frame by frame (each has at most one frame waiting, see :class:`~.inbox.Inbox`).

The protocol, per connection:

- server → client on connect: ``{"type": "ready", "defaults": {...}, "limits": {...}}``, or, when
  the server is full, ``{"type": "error", "field": "session", ...}`` and a close with code 1013;
- client → server: JSON control messages ``start`` / ``update`` / ``stop`` (see
  :mod:`~.messages`), and binary JPEG/WebP frames, numbered 0, 1, 2... in arrival order;
- server → client: ``started`` / ``updated`` / ``stopped`` replies; for each output a JSON
  ``{"type": "output", "index": i, "latency_ms": ..., "skipped": ..., "stats": {...}}`` followed
  by the image as a binary message; ``{"type": "dropped", "index": i, "dropped": total}`` for a
  stale frame replaced by a newer one; ``{"type": "error", "message", "field", "index"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
import urllib.parse

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..checks import check_int, check_number
from ..streaming import Stream
from ..streaming import DEFAULT_STEPS
from .inbox import Frame, Inbox
from .memory import release_free_memory
from .messages import FORMATS, MAX_GUIDANCE, MODES, ClientError, open_frame, parse_control
from .session import Session, Settings
from .stats import FrameStats

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_PROMPT = "a large red circle on the left, blue background"
CLOSE_TRY_AGAIN_LATER = 1013  # the WebSocket close code for "server overloaded"
CLOSE_POLICY_VIOLATION = 1008
log = logging.getLogger("fastdiff.demo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the server runs and what it accepts. Stream settings are each session's starting point."""

    steps: tuple | None = None  # img2img steps; None: the stream's default
    cfg: str = "self"
    guidance_scale: float = 1.2
    prompt: str = DEFAULT_PROMPT
    backend: str = "torch"  # or an engine backend of fastdiff.Stream's ("onnxruntime", "auto"...)
    max_sessions: int = 4
    max_message_bytes: int = 1 << 20  # any one message, frame or control
    max_frame_side: int = 1024  # width and height of a client's frames
    threads: int | None = None  # torch threads of the compute thread; None: torch's default
    router: str | None = None  # a prompt router folder (fastdiff tune route), loaded once for every session

    def __post_init__(self):
        check_int(self.max_sessions, "max_sessions", 1)
        check_int(self.max_message_bytes, "max_message_bytes", 1024)
        check_int(self.max_frame_side, "max_frame_side", 16, 8192)   # a frame's pixels are decoded in memory
        check_number(self.guidance_scale, "guidance_scale", 0.0, MAX_GUIDANCE)   # what clients may send back
        if self.threads is not None:
            check_int(self.threads, "threads", 1)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a string such as 'torch', got {self.backend!r}")

    def stream_options(self) -> dict:
        """Keyword arguments every session's Stream gets. "torch" runs the pipeline's own modules;
        any other backend is the Stream's to check and build (engines are built once, then cached)."""
        options = {"cfg": self.cfg, "output_type": "pil"}
        if self.backend != "torch":
            options["backend"] = self.backend
        return options


def create_app(pipe, config: DemoConfig | None = None, *, replica: str | None = None, cluster=None) -> FastAPI:
    """The demo's ASGI app over `pipe` (any pipeline `fastdiff.Stream` takes).

    Behind several servers (``fastdiff serve``: Ray Serve replicas), `replica` names this one in the
    "ready" message, `/health` and `/stats`, and `cluster()` gives every replica's statistics and
    their total for `/stats`."""
    config = config or DemoConfig()
    defaults = Settings(mode="img2img", prompt=config.prompt, negative_prompt=None,
                        guidance_scale=config.guidance_scale, steps=config.steps, format="jpeg")
    default_steps = {"img2img": config.steps or DEFAULT_STEPS["img2img"], "txt2img": DEFAULT_STEPS["txt2img"]}

    router = None
    if config.router is not None:   # loaded once: every session's stream shares its sub-networks
        from ..tuning.routers import load_router

        router = load_router(config.router, pipe)

    def make_stream(settings: Settings) -> Stream:
        stream = Stream(pipe, list(settings.steps or default_steps[settings.mode]), mode=settings.mode,
                        guidance_scale=settings.guidance_scale, router=router, **config.stream_options())
        stream.prepare(settings.prompt, settings.negative_prompt)
        return stream

    try:  # bad server settings fail here, at start-up, not in the first session
        make_stream(defaults)
    except ValueError as error:
        if str(error).startswith("backend"):
            raise ValueError(f"backend must be 'torch' or an engine backend of fastdiff.Stream: {error}") from error
        raise
    compute = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="fastdiff-demo-compute",
        initializer=_set_torch_threads, initargs=(config.threads,))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        compute.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="fastdiff demo", lifespan=lifespan)
    app.state.sessions = {}  # id → FrameStats of the sessions open now
    app.state.stats = FrameStats()  # the whole server's, since start
    started = time.time()

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    def snapshot() -> dict:
        return {"sessions": len(app.state.sessions), "max_sessions": config.max_sessions,
                "uptime_s": round(time.time() - started, 1), **app.state.stats.snapshot()}

    app.state.snapshot = snapshot

    @app.get("/health")
    async def health():
        return {"status": "ok", "sessions": len(app.state.sessions), "max_sessions": config.max_sessions,
                **({"replica": replica} if replica else {})}

    @app.get("/stats")
    async def stats():
        local = snapshot()
        if replica is None:
            return local
        view = await asyncio.to_thread(cluster) if cluster is not None else {}
        return {"replica": replica, **local, **view}

    @app.websocket("/ws")
    async def websocket(ws: WebSocket):
        if not same_origin(ws):  # another web site open in the user's browser must not drive the model
            await ws.close(code=CLOSE_POLICY_VIOLATION)  # before accept: the handshake gets HTTP 403
            return
        await ws.accept()
        sessions = app.state.sessions
        if len(sessions) >= config.max_sessions:
            busy = ClientError(f"the server is full: {config.max_sessions} of {config.max_sessions} sessions "
                               f"in use; try again later", field="session")
            with contextlib.suppress(*GONE):  # it may be gone already
                await ws.send_json(busy.to_message())
                await ws.close(code=CLOSE_TRY_AGAIN_LATER, reason="server full")
            return
        client = Client(ws, app.state.stats)
        sessions[id(client)] = client.stats
        try:
            await client.send({"type": "ready", "defaults": dataclasses.asdict(defaults), "replica": replica,
                               "default_steps": default_steps, "modes": list(MODES), "formats": list(FORMATS),
                               "limits": {"max_message_bytes": config.max_message_bytes,
                                          "max_frame_side": config.max_frame_side}})
            await client.run(Session(make_stream, defaults), config, compute)
        except ClientGone:
            pass  # gone while being answered: the session ends as on a disconnect
        finally:
            del sessions[id(client)]  # a disconnect frees the session, whatever ended it
            await asyncio.to_thread(release_free_memory)   # or churn grows the heap (see .memory)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def same_origin(ws: WebSocket) -> bool:
    """Browsers send the page's origin with a WebSocket handshake; other clients send none."""
    origin = ws.headers.get("origin")
    return origin is None or urllib.parse.urlsplit(origin).netloc == ws.headers.get("host")


def server_config(app: FastAPI, config: DemoConfig, host: str = "127.0.0.1", port: int = 8000, **options):
    """uvicorn's configuration for the app. A message over `max_message_bytes` gets an error reply;
    one over four times that is refused by the transport, which closes the connection (code 1009)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, ws_max_size=4 * config.max_message_bytes, **options)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, config: DemoConfig, host: str = "127.0.0.1", port: int = 0):
    """Run the app on a background thread (port 0: any free port); yields its base URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(server_config(app, config, host, port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="fastdiff-demo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the demo server did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _set_torch_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class ClientGone(Exception):
    """The client closed its connection before a message to it was sent."""


# What a send to a closed connection raises: Starlette's RuntimeError for a send after the close,
# the transport's OSError or WebSocketDisconnect for a peer that has just gone.
GONE = (WebSocketDisconnect, OSError, RuntimeError)


class Client:
    """One WebSocket connection: receives into an inbox, processes it, sends results back."""

    def __init__(self, ws: WebSocket, server_stats: FrameStats):
        self.ws = ws
        self.stats = FrameStats()
        self.server_stats = server_stats
        self.inbox = Inbox()
        self._send_lock = asyncio.Lock()  # an output's header and image must not be split

    async def send(self, *messages) -> None:
        """Send in order; :class:`ClientGone` once the client has closed (its answers have no one to go to)."""
        async with self._send_lock:
            try:
                for message in messages:
                    if isinstance(message, bytes):
                        await self.ws.send_bytes(message)
                    else:
                        await self.ws.send_json(message)
            except GONE as error:
                raise ClientGone from error

    async def error(self, error: ClientError) -> None:
        self.stats.error()
        self.server_stats.error()
        await self.send(error.to_message())

    async def run(self, session: Session, config: DemoConfig, compute) -> None:
        """Until the client disconnects."""
        worker = asyncio.create_task(self._process(session, compute))
        try:
            await self._receive(config)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker

    # -- receiving -----------------------------------------------------------------------------------
    async def _receive(self, config: DemoConfig) -> None:
        next_index = 0
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data, text = message.get("bytes"), message.get("text") or ""
            size = len(data) if data is not None else len(text.encode())
            index = None
            if data is not None:  # every binary message takes an index, refused or not
                index, next_index = next_index, next_index + 1
            try:
                if size > config.max_message_bytes:
                    raise ClientError(f"message is {size} bytes; the limit is {config.max_message_bytes}",
                                      field="frame" if index is not None else None, index=index)
                if data is not None:
                    await self._receive_frame(data, index, config)
                else:
                    self.inbox.put_control(parse_control(text))
            except ClientError as error:
                await self.error(error)
            except Exception:  # a bug of ours reading it: this client hears of it, the connection lives on
                log.exception("reading a client's message failed")
                await self.error(ClientError("the server could not read that message; see its log", index=index))

    async def _receive_frame(self, data: bytes, index: int, config: DemoConfig) -> None:
        received = time.perf_counter()
        image = open_frame(data, index, config.max_frame_side)  # the header only: cheap under a flood
        stale = self.inbox.put_frame(Frame(index, image, received))
        # Let an idle worker take this frame before the next message is read: messages already
        # buffered are read without a pause, and the next frame would replace this one unseen.
        await asyncio.sleep(0)
        if stale is not None:
            self.stats.drop()
            self.server_stats.drop()
            await self.send({"type": "dropped", "index": stale.index, "dropped": self.stats.dropped})

    # -- processing ----------------------------------------------------------------------------------
    async def _process(self, session: Session, compute) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = self.inbox.pop()
            try:
                if item is None and session.wants_generation:
                    outputs, reply = await loop.run_in_executor(compute, session.generate), None
                elif item is None:
                    await self.inbox.wait()
                    continue
                elif isinstance(item, Frame):
                    outputs, reply = await loop.run_in_executor(compute, session.process, item), None
                else:
                    outputs, reply = await loop.run_in_executor(compute, session.apply, item)
            except ClientError as error:
                await self.error(error)
                continue
            except Exception:  # a bug of ours: this client hears of it, the server and its session live on
                log.exception("processing a client's message failed")
                await self.error(ClientError("the server failed to process that message; see its log"))
                continue
            for output in outputs:
                latency_s = time.perf_counter() - output.started_s
                self.stats.output(latency_s)
                self.server_stats.output(latency_s)
                await self.send({"type": "output", "index": output.index, "skipped": output.skipped,
                                 "latency_ms": round(latency_s * 1000, 2), "stats": self.stats.snapshot()},
                                output.data)
            if reply is not None:
                await self.send(reply)
