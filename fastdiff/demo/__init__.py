"""The real-time demo app: a FastAPI server with a WebSocket per client and a plain HTML/JS page.

Needs the ``demo`` extra (``pip install "fastdiff[demo]"``). Start it with ``fastdiff demo``.
"""

from .server import DemoConfig, create_app, serve_in_thread, server_config

__all__ = ["DemoConfig", "create_app", "serve_in_thread", "server_config"]
