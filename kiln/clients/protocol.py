"""`EngineClient`: the one interface the server (and CLI) use to run requests.

The native drivers (`AsyncEngine`, `ProcessEngine`) and the TensorRT-LLM backend implement it; tests may
use a double. What it reports (`ModelInfo`, `EngineStats`) is made by the engine: see kiln.engine.info.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    """Rules:
    - `generate` yields one `RequestOutput` per engine step in which the request produced something;
      its completions are deltas (see `CompletionOutput`). The last one has `finished=True`.
    - Closing the iterator early (client gone) aborts the request; its KV blocks are free within a step.
    - `generate` raises ValueError for a request the engine can never run (prompt too long, bad params)
      before yielding anything.
    - `abort` on an unknown or finished id does nothing.
    - Requests given one `owner` share one fair share of the engine (the server passes its request id,
      so a completion's prompts count as one client); None: the request is its own owner.
    - `check_health` raises EngineDeadError (kiln.clients.messages) when the engine can no longer serve:
      it stopped, or did not answer within `timeout` seconds. A driver that can replace a failed engine
      also has `restart()` (the server's supervisor calls it when present).
    """

    @property
    def tokenizer(self) -> Any: ...  # kiln.models.tokenizer.Tokenizer

    @property
    def model_info(self) -> ModelInfo: ...

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
        owner: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def check_health(self, timeout: float) -> None: ...

    async def start(self) -> None: ...  # begin the step loop (idempotent)

    async def shutdown(self) -> None: ...  # stop the step loop; running requests are aborted
