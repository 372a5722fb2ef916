"""Running the app with uvicorn: in the foreground (``peftkit serve``) or in a background thread (tests,
benchmarks, notebooks), always on a loopback address unless the operator names another."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from peftkit.serve.app import create_app
from peftkit.serve.engine import Engine

DEFAULT_HOST = "127.0.0.1"


def serve(engine: Engine, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C), then stop the scheduler."""
    engine.start()
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
    finally:
        engine.stop()


class BackgroundServer:
    """The server on a free loopback port in a daemon thread: ``with BackgroundServer(engine) as url: ...``."""

    def __init__(self, engine: Engine, host: str = DEFAULT_HOST, port: int | None = None) -> None:
        self.engine = engine
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(create_app(engine), host=host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="peftkit-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
