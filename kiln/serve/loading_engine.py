"""`LoadingEngine`: an EngineClient whose engine is loaded when the server starts, not before.

`kiln serve` binds its port first and loads the weights in the app's startup, so a big model's
minutes of loading are visible: /health answers 200 (the process is alive, a liveness probe must not
kill it) and /ready answers 503 "loading" until the engine runs.

Rules: the loader runs once, in a thread of its own (the event loop keeps serving /health), from
`begin()` or else from `start()`; `start()` waits for it, then starts the loaded engine. `kiln serve`
calls `begin()` before it imports the web stack, so the engine process starts ~0.7 s sooner (part of
a warm restart's time to ready, benchmarks/warm_start.py). Before the engine is loaded, `model_info`
and `tokenizer` raise a 503 (`not_ready`), `stats()` reports an empty engine, `abort` does nothing.
A loader error propagates from `start()`. Importing this module imports neither torch nor FastAPI
(tests/unit/test_serve_imports.py): `kiln serve` creates it before the engine process starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from kiln.clients.protocol import EngineClient
from kiln.engine.info import BatchingLimits, EngineStats, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LoadingEngine:
    def __init__(self, loader: Callable[[], EngineClient]) -> None:
        self._loader = loader
        self._engine: EngineClient | None = None
        self._loading: concurrent.futures.Future[EngineClient] | None = None

    def begin(self) -> None:
        """Start loading now, in the background (once; later calls do nothing)."""
        if self._loading is not None:
            return
        self._loading = concurrent.futures.Future()
        threading.Thread(target=self._load, name="kiln-engine-loader", daemon=True).start()

    def _load(self) -> None:
        assert self._loading is not None
        began = time.perf_counter()
        try:
            engine = self._loader()
        except BaseException as exc:  # kept for start(), which raises it
            self._loading.set_exception(exc)
            return
        logger.info("model loaded in %.2f s", time.perf_counter() - began)
        self._loading.set_result(engine)

    @property
    def loaded(self) -> EngineClient:
        if self._engine is None:
            # Deferred: FastAPI; `kiln serve` imports this module before it starts the engine process.
            from kiln.serve.errors import UnavailableError

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
            self.begin()
            assert self._loading is not None
            self._engine = await asyncio.wrap_future(self._loading)
        await self._engine.start()

    async def check_health(self, timeout: float) -> None:
        await self.loaded.check_health(timeout)

    async def restart(self) -> None:
        """The loaded engine's `restart`; AttributeError when it has none (the supervisor checks)."""
        await self.loaded.restart()  # type: ignore[attr-defined]

    @property
    def can_restart(self) -> bool:
        return self._engine is not None and hasattr(self._engine, "restart")

    async def set_batching(self, limits: BatchingLimits) -> None:
        """The loaded engine's `set_batching`; AttributeError when it has none (`can_set_batching`)."""
        await self.loaded.set_batching(limits)  # type: ignore[attr-defined]

    @property
    def can_set_batching(self) -> bool:
        return self._engine is not None and hasattr(self._engine, "set_batching")

    async def shutdown(self) -> None:
        if self._engine is not None:
            await self._engine.shutdown()
