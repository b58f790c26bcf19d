"""What the third-party client tests (LangChain, LiteLLM) share: a guard that fails any connection beyond
loopback, the docs' examples of those clients, and a server over the default model to run them on.

Why the guard: LangChain and LiteLLM can reach out by themselves (tracing, price lists, tiktoken's
encoding files); CI has no route out, so a test that needs the network must fail here too, not hang or
pass by luck.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kiln.build.default_model import DEFAULT_MODEL_NAME, ensure_default_engine
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.serve.background import serve_in_background
from kiln.serve.settings import ServerSettings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "server.md"

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class NetworkUsed(AssertionError):
    """A client tried to connect somewhere other than the local test server."""


@contextmanager
def loopback_only() -> Iterator[None]:
    """While open, `socket.connect` / `connect_ex` to a non-loopback address raises `NetworkUsed`
    (Unix sockets pass)."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise NetworkUsed(f"a test client connected to {address!r}: tests must not need the network")

    def guarded_connect(self: socket.socket, address: Any) -> None:
        check(address)
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        yield


def docs_example(marker: str) -> str:
    """The Python block of docs/server.md's "LangChain and LiteLLM" section that contains `marker`."""
    section = DOCS.read_text().split("### LangChain and LiteLLM", 1)[1].split("\n## ", 1)[0]
    [block] = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if marker in b]
    return block


@contextmanager
def default_model_server() -> Iterator[str]:
    """The default model (built once into the cache) served as `kiln serve` names it; yields its URL."""
    engine = AsyncEngine.from_path(
        ensure_default_engine(progress=False), EngineConfig(device="cpu", load_progress=False)
    )
    settings = ServerSettings(port=0, log_level="warning", served_model_name=DEFAULT_MODEL_NAME)
    with serve_in_background(engine, settings) as (url, _server):
        yield url


@contextmanager
def no_field_ignored() -> Iterator[None]:
    """Fails when the server ignored a request field it did not know (its `kiln.serve` log line): a
    client's field that Kiln drops in silence is a gap to close, not to leave unseen."""
    logger = logging.getLogger("kiln.serve")
    ignored: list[str] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ignoring unknown fields" in record.getMessage():
                ignored.append(record.getMessage())

    watch, level = Watch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
    assert not ignored, ignored
