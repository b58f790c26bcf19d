"""Browser test fixtures: Debian's chromium (installed in the session when missing, see browser_host.py),
a fresh headless Chrome per test, and `kiln serve` on the tiny model with its steps slowed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from browser_host import Unavailable, browser_binaries, start_slow_server, stop_server
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from server_harness import open_tiny_engine

from kiln.clients.thread import AsyncEngine

# Each engine step sleeps this long first: ~40 tokens/s, so an answer of a few hundred tokens streams
# for seconds (the tiny model alone streams one in under a second).
STEP_DELAY = 0.025


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths; the apt packages are installed first when missing."""
    try:
        return browser_binaries()
    except Unavailable as exc:
        pytest.skip(f"cannot run a browser on this machine: {exc}")


@pytest.fixture
def browser(chromium: tuple[str, str]) -> Iterator[webdriver.Chrome]:
    """A headless Chrome, 1280x800, with its own empty profile (so no localStorage from another test)."""
    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # with the driver's path given too, Selenium downloads nothing
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def slow_server(tiny_gqa_dir: Path) -> Iterator[str]:
    """`kiln serve` on the tiny model (served as `tiny`), each step STEP_DELAY slower: its URL."""
    proc, url, _log = start_slow_server(tiny_gqa_dir, STEP_DELAY)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def tiny_engine(tiny_gqa_dir: Path) -> Iterator[AsyncEngine]:
    engine = open_tiny_engine(tiny_gqa_dir)
    yield engine
    asyncio.run(engine.shutdown())
