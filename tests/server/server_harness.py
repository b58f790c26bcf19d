"""Helpers for the server tests: a real uvicorn server in a thread, the tiny native engine, polling."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kiln.clients.protocol import EngineClient
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.serve.background import serve_in_background
from kiln.serve.runner import DrainingServer
from kiln.serve.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]


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


def start_cli_server(
    checkpoint: Path, *flags: str, launcher: Sequence[str] = ("-m", "kiln.cli")
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """`kiln serve CHECKPOINT FLAGS...` in a subprocess on a free port, once ready: (process, URL, stderr lines).
    `launcher`: what the interpreter runs before `serve ...`, the `kiln` command line or a script that
    ends in it (tests/browser/slow_serve.py)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, *launcher, "serve", str(checkpoint), "--port", "0"]
    command += ["--served-model-name", "tiny", "--num-kv-blocks", "256", *flags]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout=120):
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(log))
    # The port opens before the weights load; wait until the model is ready.
    if not wait_for(lambda: _ready(url[0]), timeout=120):
        proc.kill()
        raise AssertionError("server never became ready:\n" + "".join(log))
    return proc, url[0], log


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@dataclass(slots=True)
class BackgroundStream:
    """A streamed completion read on its own thread: its lines as they come, `started` at the first chunk."""

    thread: threading.Thread
    lines: list[str]
    started: threading.Event

    def payloads(self) -> list[str]:
        return [line[6:] for line in self.lines if line.startswith("data: ")]


def stream_in_background(url: str, body: dict[str, Any]) -> BackgroundStream:
    """POST `body` (a streaming completion) to `url`/v1/completions, reading it on a thread."""
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    started.set()

    thread = threading.Thread(target=read)
    thread.start()
    return BackgroundStream(thread, lines, started)


def longest_stream_body(url: str) -> dict[str, Any]:
    """A streaming completion that fills the served model's whole context (the longest it can run)."""
    max_len = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
    return {"prompt": [5, 6], "max_tokens": max_len - 2, "ignore_eos": True, "stream": True}
