"""`LoadingEngine`: an EngineClient whose engine is loaded when the server starts, not before.

`kiln serve` binds its port first and loads the weights in the app's startup, so a big model's
minutes of loading are visible: /health answers 200 (the process is alive, a liveness probe must not
kill it) and /ready answers 503 "loading" until the engine runs.

Rules: `start()` runs the loader in a worker thread (the event loop keeps serving /health), then
starts the loaded engine; before that, `model_info` and `tokenizer` raise a 503 (`not_ready`),
`stats()` reports an empty engine, `abort` does nothing. A loader error propagates from `start()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from kiln.clients.protocol import EngineClient
from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.serve.errors import UnavailableError


class LoadingEngine:
    def __init__(self, loader: Callable[[], EngineClient]) -> None:
        self._loader = loader
        self._engine: EngineClient | None = None

    @property
    def loaded(self) -> EngineClient:
        if self._engine is None:
            raise UnavailableError("the model is still loading; retry shortly", code="not_ready")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self.loaded.model_info

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
        owner: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self.loaded.generate(
            prompt_token_ids, params, request_id, prompt=prompt, priority=priority, owner=owner
        )

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self._engine.stats() if self._engine is not None else EngineStats()

    async def start(self) -> None:
        if self._engine is None:
            self._engine = await asyncio.to_thread(self._loader)
        await self._engine.start()

    async def check_health(self, timeout: float) -> None:
        await self.loaded.check_health(timeout)

    async def restart(self) -> None:
        """The loaded engine's `restart`; AttributeError when it has none (the supervisor checks)."""
        await self.loaded.restart()  # type: ignore[attr-defined]

    @property
    def can_restart(self) -> bool:
        return self._engine is not None and hasattr(self._engine, "restart")

    async def shutdown(self) -> None:
        if self._engine is not None:
            await self._engine.shutdown()
