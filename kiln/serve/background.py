"""Run the server in a background thread of this process (for `kiln chat` / `kiln complete` without
`--url`, and for tests): the same uvicorn server `kiln serve` runs, on a free loopback port."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kiln.clients.protocol import EngineClient
from kiln.serve.rollout import Rollout
from kiln.serve.runner import DrainingServer, make_server
from kiln.serve.settings import ServerSettings


@contextmanager
def serve_in_background(
    engine: EngineClient,
    settings: ServerSettings,
    *,
    shutdown_engine: bool = True,
    start_timeout: float = 60.0,
    rollout: Rollout | None = None,
) -> Iterator[tuple[str, DrainingServer]]:
    """Yield (base URL, server) once the server accepts connections and its engine runs; stop it
    (and join) on exit. Raises the engine's error if it cannot start.

    `settings.port` 0 picks a free port. The server thread has its own event loop and no signal
    handlers (uvicorn installs them only on the main thread).
    """
    server = make_server(engine, settings, shutdown_engine=shutdown_engine, rollout=rollout)
    thread = threading.Thread(target=server.run, name="kiln-server", daemon=True)
    thread.start()
    admission = server.state.admission
    deadline = time.monotonic() + start_timeout
    while not (server.started and admission.ready):
        if server.start_error is not None:
            thread.join(timeout=settings.drain_timeout_seconds + 10)
            raise server.start_error
        if not thread.is_alive():
            raise RuntimeError("the in-process server failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the in-process server did not start within {start_timeout} s")
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=settings.drain_timeout_seconds + 10)


def loop_cpu_seconds(server: DrainingServer) -> float:
    """CPU seconds the server's event-loop thread has used so far, read on that thread: what a served
    benchmark divides by its wall time to see whether the server's one loop was the limit."""

    async def read() -> float:
        return time.thread_time()

    assert server.state.loop is not None  # set by the app's lifespan, before the server is ready
    return asyncio.run_coroutine_threadsafe(read(), server.state.loop).result(timeout=30)
