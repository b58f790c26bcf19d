"""Helpers for the server tests: a real uvicorn server in a thread, the tiny native engine, polling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.clients.protocol import EngineClient
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.serve.background import serve_in_background
from kiln.serve.runner import DrainingServer
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
    """`kiln serve`'s server over `engine` on a free loopback port; the engine outlives it."""
    config = ServerSettings(**{"host": "127.0.0.1", "port": 0, "log_level": "warning", **settings})
    with serve_in_background(engine, config, shutdown_engine=False) as (url, server):
        yield LiveServer(url=url, server=server, engine=engine)


def open_tiny_engine(checkpoint: Path, **options: Any) -> AsyncEngine:
    return AsyncEngine.from_path(checkpoint, EngineConfig(**{"num_kv_blocks": 512, **options}))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` passes (for state another thread settles)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
