"""`ServerState`: what every handler of one app shares (stored as `app.state.kiln`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fastapi import Request

from kiln.clients.protocol import EngineClient
from kiln.serve.admission import Admission
from kiln.serve.errors import APIError, NotFoundError, UnavailableError
from kiln.serve.metrics import ServerMetrics
from kiln.serve.response_store import ResponseStore
from kiln.serve.settings import ServerSettings
from kiln.serve.slo import SloBatching

if TYPE_CHECKING:
    from kiln.serve.background_responses import BackgroundRun


class OpenRequest(Protocol):
    """A request in flight (a `Generation`) that the server can end early."""

    def fail(self, error: APIError) -> None: ...


@dataclass(slots=True)
class ServerState:
    engine: EngineClient
    settings: ServerSettings
    admission: Admission
    metrics: ServerMetrics
    # Called when the engine fails to start or goes down for good (the runner stops the server, exiting
    # with the error).
    on_engine_failure: Callable[[BaseException], None] | None = field(default=None)
    open_generations: set[OpenRequest] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None  # the app's, once it started
    drain_scheduled: bool = False
    # The model's defaults of the sampling fields a request omits (kiln.serve.sampling), once it started.
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    slo: SloBatching | None = None  # SLO-driven batching, when a target is set
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(0))  # /v1/responses' store
    # Background responses still running, by id (kiln.serve.background_responses).
    background_runs: dict[str, BackgroundRun] = field(default_factory=dict)

    def fail_open(self, error: APIError) -> None:
        """End every request in flight with `error`."""
        for generation in list(self.open_generations):
            generation.fail(error)

    def begin_drain(self) -> None:
        """Stop taking work; requests still in flight when the drain timeout runs out end with a 503
        naming the shutdown (streams: an error event, then [DONE]) rather than being cut off. Called on
        the app's event loop, once."""
        self.admission.draining = True
        if self.drain_scheduled:
            return
        self.drain_scheduled = True
        timeout = self.settings.drain_timeout_seconds
        error = UnavailableError(
            f"the server shut down before this request finished (drain timeout {timeout:g} s); retry",
            code="draining",
        )
        asyncio.get_running_loop().call_later(timeout, self.fail_open, error)

    @property
    def default_max_tokens(self) -> int | None:
        """max_tokens of a request that sends none: the server's `default_max_tokens`, else the model's."""
        model_default = self.sampling_defaults.get("max_tokens")
        return self.settings.default_max_tokens or (None if model_default is None else int(model_default))

    @property
    def model_name(self) -> str:
        """The name clients send as `model` (503 while the engine is still loading)."""
        return self.settings.served_model_name or self.engine.model_info.name

    def check_model(self, requested: str | None) -> None:
        """404 unless `requested` names the served model (omitted: the served model)."""
        if requested is not None and requested != self.model_name:
            raise NotFoundError(
                f"model {requested!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


def server_state(request: Request) -> ServerState:
    return request.app.state.kiln
