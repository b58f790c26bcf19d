"""Helpers for the server tests: a real uvicorn server in a thread, the tiny native engine, polling.

`run_live_server(engine, **settings)` runs `kiln.serve.runner.make_server` (the server `kiln serve`
runs) on a free loopback port in a thread with its own event loop, and always tears it down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.options import EngineOptions
from kiln.engine.protocol import EngineClient
from kiln.serve.runner import DrainingServer, make_server
from kiln.serve.settings import ServerSettings


@dataclass(slots=True)
class LiveServer:
    url: str
    server: DrainingServer
    engine: EngineClient

    @property
    def state(self) -> Any:
        return self.server.config.app.state.kiln


@contextmanager
def run_live_server(engine: EngineClient, **settings: Any) -> Iterator[LiveServer]:
    config = ServerSettings(**{"host": "127.0.0.1", "port": 0, "log_level": "warning", **settings})
    server = make_server(engine, config, shutdown_engine=False)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", server=server, engine=engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


def open_tiny_engine(checkpoint: Path, **options: Any) -> AsyncEngine:
    return AsyncEngine.from_path(checkpoint, EngineOptions(**{"num_kv_blocks": 512, **options}))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` passes (for state another thread settles)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
