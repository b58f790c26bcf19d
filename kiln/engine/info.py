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


@dataclass(frozen=True, slots=True)
class BatchingLimits:
    """The scheduler's batching limits (see `kiln.engine.scheduler.SchedulerConfig`). In a change
    (`LLMEngine.set_batching`, the drivers' `SetBatching`) None leaves a limit as it is; in a report
    (`EngineStats.batching`) every limit is set, and in `EngineStats.batching_ceiling` None means "no
    ceiling"."""

    admission_interval: int | None = None  # while requests run, admit waiting ones every this many steps
    max_num_batched_tokens: int | None = None  # token budget of one step
    max_num_seqs: int | None = None  # requests running at once


def check_batching(limits: BatchingLimits, ceiling: BatchingLimits) -> None:
    """Raise ValueError unless every limit given is at least 1 and at most its ceiling (None: none)."""
    for name in ("admission_interval", "max_num_batched_tokens", "max_num_seqs"):
        value, most = getattr(limits, name), getattr(ceiling, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if most is not None and value > most:
            raise ValueError(
                f"{name} {value} is above the {most} this engine was configured with (its graphs and "
                "buffers are sized for that)"
            )


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
    busy_seconds: float = 0.0  # wall seconds spent in steps since start
    # Of those, the steps after whose scheduling requests were still waiting (the engine was the
    # bottleneck), and the prompt tokens they computed: their ratio is how fast a queue drains.
    backlog_seconds: float = 0.0
    backlog_prefill_tokens: int = 0
    # Triton kernel variants this engine's process built, and their seconds (kiln.kernels.compile_watch):
    # after start-up each one stalled every running stream.
    kernel_compiles: int = 0
    kernel_compile_seconds: float = 0.0
    batching: BatchingLimits | None = None  # the limits in force; None: the engine does not say
    # The most each limit may be set to (what the engine was configured and captured its graphs for).
    batching_ceiling: BatchingLimits | None = None

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
