"""`EngineClient`: the one interface the server (and CLI) use to run requests.

The native `AsyncEngine` and the TensorRT-LLM backend both implement it; tests may use a double.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class ModelInfo:
    """What the server reports about the loaded model."""

    name: str  # served model name (the `model` field clients send)
    backend: str  # "native" | "trtllm"
    max_model_len: int  # prompt + completion tokens a request may use
    dtype: str
    engine_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of engine load, for metrics, readiness and admission control."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0  # prompt tokens not yet computed by waiting requests
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0  # since start
    num_steps: int = 0  # model steps run since start
    num_step_seqs: int = 0  # sequences computed in those steps, summed over steps
    num_step_tokens: int = 0  # tokens computed in those steps, summed over steps

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@runtime_checkable
class EngineClient(Protocol):
    """Rules:
    - `generate` yields one `RequestOutput` per engine step in which the request produced something;
      its completions are deltas (see `CompletionOutput`). The last one has `finished=True`.
    - Closing the iterator early (client gone) aborts the request; its KV blocks are free within a step.
    - `generate` raises ValueError for a request the engine can never run (prompt too long, bad params)
      before yielding anything.
    - `abort` on an unknown or finished id does nothing.
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
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None: ...  # begin the step loop (idempotent)

    async def shutdown(self) -> None: ...  # stop the step loop; running requests are aborted
