import socket
import threading
import time

import httpx
import uvicorn

from serving.config import EngineConfig
from serving.server import create_app, server_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """uvicorn on 127.0.0.1 in a background thread, for the lifetime of a `with` block."""

    def __init__(self, engine, timeout_graceful_shutdown: float = EngineConfig.timeout_graceful_shutdown, **kwargs):
        self.port = free_port()
        self.engine = engine
        app = create_app(engine, **kwargs)
        self.server = uvicorn.Server(
            server_config(app, "127.0.0.1", self.port, "warning", timeout_graceful_shutdown=timeout_graceful_shutdown)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
