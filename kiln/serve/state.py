"""`ServerState`: what every handler of one app shares (stored as `app.state.kiln`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from kiln.clients.protocol import EngineClient
from kiln.serve.admission import Admission
from kiln.serve.errors import NotFoundError
from kiln.serve.metrics import ServerMetrics
from kiln.serve.settings import ServerSettings


@dataclass(slots=True)
class ServerState:
    engine: EngineClient
    settings: ServerSettings
    admission: Admission
    metrics: ServerMetrics
    # Called when the engine fails to start (the runner stops the server and reports the error).
    on_start_failure: Callable[[BaseException], None] | None = field(default=None)

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
