"""Server test fixtures: the real native engine on the tiny checkpoint, and a server over it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import LiveServer, open_tiny_engine, run_live_server

from kiln.clients.thread import AsyncEngine


@pytest.fixture(scope="session")
def tiny_engine(tiny_gqa_dir: Path) -> Iterator[AsyncEngine]:
    engine = open_tiny_engine(tiny_gqa_dir)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def server(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    """A default-settings server over the shared tiny engine, serving it as `tiny`."""
    with run_live_server(tiny_engine, served_model_name="tiny") as live:
        yield live
