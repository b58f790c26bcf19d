"""`prepare_process`: the process-wide state an engine's process runs with, set once, explicitly.

Rules: building an engine changes nothing outside it; whoever owns the process (`kiln serve`, its engine
child process, `kiln.LLM`, the benchmarks) calls `prepare_process` once its engine is built and before
the first request. It
- seeds torch's global RNG with `seed`: requests without their own seed draw their sampling noise from
  it (kiln.engine.sampler), so the same seed and the same requests give the same outputs. It is seeded
  after the engine is built, not before, so what loading and CUDA-graph capture draw from the RNG does
  not shift the sequence the requests see;
- settles the garbage collector (kiln.engine.gc_tuning), which must see the built engine to freeze it.
"""

from __future__ import annotations

import torch

from kiln.config import EngineConfig, ResolvedEngineConfig
from kiln.engine.gc_tuning import settle_garbage_collector


def prepare_process(config: EngineConfig | ResolvedEngineConfig) -> None:
    torch.manual_seed(config.seed)
    settle_garbage_collector()
