"""What an engine reports about itself: the model it serves (`ModelInfo`) and its load (`EngineStats`).

Made by `LLMEngine` (and the TensorRT-LLM backend); read through `EngineClient` by the server's metrics,
readiness and admission control.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
