"""The reliability battery: what one client, a dying engine or a shutdown can do to a running server.

Every test here runs a real server on loopback (in-process over the tiny engine, or `kiln serve` in a
subprocess), bounded in time. The server tests' harness (tests/server/server_harness.py) is shared.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_harness import open_tiny_engine

from kiln.clients.thread import AsyncEngine


@pytest.fixture(scope="session")
def tiny_engine(tiny_gqa_dir: Path) -> Iterator[AsyncEngine]:
    engine = open_tiny_engine(tiny_gqa_dir)
    yield engine
    asyncio.run(engine.shutdown())
