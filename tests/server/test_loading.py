"""`kiln serve` opens its port before the weights load: alive (/health) at once, ready when loaded."""

from __future__ import annotations

import threading

import httpx
import pytest
from server_harness import wait_for

from kiln.clients.thread import AsyncEngine
from kiln.errors import InvalidEngineError
from kiln.serve.background import serve_in_background
from kiln.serve.loading_engine import LoadingEngine
from kiln.serve.runner import make_server
from kiln.serve.settings import ServerSettings

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_health_while_loading_ready_once_loaded(tiny_engine: AsyncEngine) -> None:
    release = threading.Event()

    def load() -> AsyncEngine:
        release.wait(timeout=60)
        return tiny_engine

    settings = ServerSettings(port=0, served_model_name="tiny", log_level="warning")
    server = make_server(LoadingEngine(load), settings, shutdown_engine=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.get(f"{url}/ready")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{url}/v1/models").status_code == 503
        assert "kiln_num_requests_running 0.0" in httpx.get(f"{url}/metrics").text
        release.set()
        assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200)
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=30)


def test_a_model_that_cannot_load_stops_the_server_with_its_error() -> None:
    def load() -> AsyncEngine:
        raise InvalidEngineError("engine.json is corrupt")

    settings = ServerSettings(port=0, log_level="error")
    with (
        pytest.raises(InvalidEngineError, match="corrupt"),
        serve_in_background(LoadingEngine(load), settings),
    ):
        pass
