"""`prepare_process`: the process-wide state an engine's process runs with, set once, explicitly.

Rules: building an engine changes nothing outside it; whoever owns the process (`kiln serve`, its engine
child process, `kiln.LLM`, the benchmarks) calls `prepare_process` once its engine is built and before
the first request. It
- seeds torch's global RNG with `seed`: requests without their own seed draw their sampling noise from
  it (kiln.engine.sampler), so the same seed and the same requests give the same outputs. It is seeded
  after the engine is built, not before, so what loading and CUDA-graph capture draw from the RNG does
  not shift the sequence the requests see;
- sizes torch's CPU threads to the cores this process may use (its affinity, not the machine's),
  one fewer where an engine shares the cores with the server's front end, and one thread in a front
  end whose engine runs in another process: torch's default of every core oversubscribes the machine
  when two processes compute, and a step then waits on threads that are not running. An explicit
  OMP_NUM_THREADS is left as it is;
- settles the garbage collector (kiln.engine.gc_tuning), which must see the built engine to freeze it.

Importing this module does not import torch: `kiln serve` imports it before its engine process starts.
"""

from __future__ import annotations

import os

from kiln.config import EngineConfig, ResolvedEngineConfig
from kiln.engine.gc_tuning import settle_garbage_collector


def prepare_process(config: EngineConfig | ResolvedEngineConfig, *, runs_engine: bool = True) -> None:
    """`runs_engine`: False in a front end whose engine runs in a child process."""
    import torch  # deferred: see the module's rule

    torch.manual_seed(config.seed)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(engine_threads() if runs_engine else 1)
    settle_garbage_collector()


def engine_threads() -> int:
    """Threads for the engine's CPU work: the cores this process may use, less one for the front end."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)
