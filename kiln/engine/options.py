"""`EngineOptions`: runtime knobs of an engine, set by `kiln serve` flags / KILN_* variables or `kiln.LLM(...)`.

None means "take it from the engine directory's limits or from the model".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineOptions:
    dtype: str | None = None  # None: the engine dir's dtype; float32 for an HF dir on CPU
    device: str | None = None  # None: cuda if available, else cpu
    max_num_seqs: int | None = None  # cap on running requests (default: engine limits.max_batch_size)
    max_num_batched_tokens: int | None = None  # token budget per step (default: limits.max_num_tokens)
    max_model_len: int | None = None  # prompt + output tokens (default: limits / model max positions)
    block_size: int | None = None  # tokens per KV block (default: limits.block_size)
    num_kv_blocks: int | None = None  # exact KV pool size; overrides the memory budget below
    kv_cache_memory_bytes: int | None = None  # KV budget (CPU default: 1 GiB)
    gpu_memory_utilization: float = 0.90  # on CUDA: fraction of GPU memory for weights + activations + KV
    enable_prefix_caching: bool = True
    # While requests run, admit waiting ones every this many steps (see SchedulerConfig).
    admission_interval: int = 1
    enforce_eager: bool = False  # on CUDA: skip capturing decode CUDA graphs
    # On CUDA: also graph steps that mix prefills and decodes, piece by piece around attention
    # (kiln.engine.piecewise_graphs): under a steady stream of arrivals nearly every step is one.
    piecewise_graphs: bool = True
    # Schedule and launch step N+1 before reading step N's tokens (overlaps host work with the GPU).
    # None: on for CUDA, off on CPU (where nothing runs asynchronously, so it would only cost the
    # extra step a stopping request takes).
    async_scheduling: bool | None = None
    served_model_name: str | None = None
    seed: int = 0  # global RNG seed for requests without their own
    load_progress: bool = False  # show a progress bar while the weights load
    # Run the engine's step loop in a child process (ProcessEngine), so a server's HTTP work does not
    # share the GIL with it. Only open_engine (kiln serve) looks at it.
    engine_process: bool = False
