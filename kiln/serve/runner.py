"""Run the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

Drain, in order: the server stops accepting connections and new requests get 503 (readiness too);
requests in flight — streams included — may run for `drain_timeout_seconds`, and those still running
then end with a 503 naming the shutdown (a stream: an error event and `[DONE]`); then the engine shuts
down and the process exits 0. A second Ctrl-C forces the exit (uvicorn's rule). An engine that goes
down for good (see kiln.serve.supervisor) stops the server too: `run_server` raises its error.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn

from kiln.clients.protocol import EngineClient
from kiln.serve.app import create_app
from kiln.serve.http_limits import ConnectionLimits, limited_http_protocol, warn_if_fd_limit_low
from kiln.serve.rollout import Rollout
from kiln.serve.settings import ServerSettings
from kiln.serve.state import ServerState


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that also flips the app's drain flag when asked to exit, and stops (keeping
    the error in `start_error`) when the engine cannot start."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.start_error: BaseException | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.admission.draining = True  # /ready says so at once
        if self.state.loop is not None:
            self.state.loop.call_soon_threadsafe(self.state.begin_drain)
        super().handle_exit(sig, frame)

    def engine_failed(self, error: BaseException) -> None:
        """The engine could not start, or is down for good: stop, and make `run_server` raise `error`."""
        self.start_error = error
        self.should_exit = True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (test runners swap it), not the one at setup."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _not_request_lines(record: logging.LogRecord) -> bool:
    return not record.name.startswith("kiln.request")


def configure_logging(level: str) -> None:
    """Kiln's logs to stderr; the per-request JSON lines bare (no prefix), so log shippers parse them.

    Idempotent. Records still propagate to the root logger (pytest's caplog, an app's own handlers).
    """
    numeric = getattr(logging, level.upper())
    kiln_logger = logging.getLogger("kiln")
    kiln_logger.setLevel(numeric)
    if not any(isinstance(h, _StderrHandler) for h in kiln_logger.handlers):
        prefixed = _StderrHandler()
        prefixed.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        prefixed.addFilter(_not_request_lines)
        kiln_logger.addHandler(prefixed)
    request_logger = logging.getLogger("kiln.request")
    if not any(isinstance(h, _StderrHandler) for h in request_logger.handlers):
        bare = _StderrHandler()
        bare.setFormatter(logging.Formatter("%(message)s"))
        request_logger.addHandler(bare)


def make_server(
    engine: EngineClient,
    settings: ServerSettings,
    *,
    shutdown_engine: bool = True,
    rollout: Rollout | None = None,
) -> DrainingServer:
    """The uvicorn server for `engine` (not started): `.run()` blocks, `.serve()` is its coroutine.
    `rollout`: a model repository's control plane, whose router `engine` is (see `create_app`)."""
    app = create_app(engine, settings, shutdown_engine=shutdown_engine, rollout=rollout)
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout_seconds,
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections,
        retry_after_seconds=settings.retry_after_seconds,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        # A little past the streams' own grace period, so they end cleanly before uvicorn cancels tasks.
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds) + 1,
        lifespan="on",
        # httptools with the head deadline, head size limit and connection cap (kiln.serve.http_limits).
        http=limited_http_protocol(limits),
    )
    warn_if_fd_limit_low(settings.max_connections, config.backlog)
    server = DrainingServer(config, app.state.kiln)
    app.state.kiln.on_engine_failure = server.engine_failed
    return server


def run_server(engine: EngineClient, settings: ServerSettings, *, rollout: Rollout | None = None) -> None:
    """Serve until SIGTERM/SIGINT, drain, and return (the caller then exits 0).

    Raises the engine's error when it could not start (a `LoadingEngine` that failed to load).
    """
    configure_logging(settings.log_level)
    server = make_server(engine, settings, rollout=rollout)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it caught once it has shut down, under the handler that was
        # installed before it; with the default handler that kills the process (exit -15) after a
        # perfectly clean drain. A no-op handler there makes the drained exit a normal return.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    server.run()
    if server.start_error is not None:
        raise server.start_error
