"""`ServerState`: what every handler of one app shares (stored as `app.state.kiln`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from kiln.engine.protocol import EngineClient
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
    model_name: str

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
