"""The offline measurements of `kiln bench`: throughput of a batch added at once, and batch-1 latency.

Rules (the module doc of kiln.bench.cli has the whole list): prompts are random token ids, every request
is greedy with `ignore_eos`, and a warm-up runs before anything is timed (for throughput, one at the
workload's shapes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from kiln.bench.workload import greedy, random_prompts, sync
from kiln.kernels.compile_watch import compile_watch


@dataclass(slots=True)
class ThroughputResult:
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float
    # Triton kernel variants the engine built during the timed pass: each one's seconds count in elapsed_s,
    # so a figure with any is a cold run's (the warm-up missed a shape), not the engine's speed.
    kernel_compiles: int = 0

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s


@dataclass(slots=True)
class LatencyResult:
    input_len: int
    output_len: int
    ttft_ms: float
    ms_per_token: float


def run_throughput(
    engine,
    num_requests: int,
    input_lens: list[int],
    output_lens: list[int],
    seed: int = 0,
    warm: bool = True,
) -> ThroughputResult:
    """Add every request at once, step until all finish; see the module doc for the rules. `warm`: run
    `warm_up` first (a caller that reads the engine's counters around the timed pass runs it itself)."""
    if warm:
        warm_up(engine, num_requests, input_lens, output_lens, seed)
    prompts = random_prompts(num_requests, input_lens, engine.model_config.vocab_size, seed)
    watch = compile_watch()
    if watch is not None:  # a variant the warm-up missed is logged with what made it new
        watch.warn_from_now()
    compiles = engine.stats().kernel_compiles
    start = time.perf_counter()
    generated = _generate(engine, "r", prompts, output_lens)
    sync(engine)
    elapsed = time.perf_counter() - start
    compiled = engine.stats().kernel_compiles - compiles
    return ThroughputResult(num_requests, sum(input_lens), generated, elapsed, compiled)


def warm_up(engine, num_requests: int, input_lens: list[int], output_lens: list[int], seed: int = 0) -> None:
    """A throughput workload's warm-up, at its own shapes: as many requests as run at once, with its first
    prompt lengths and at most 16 tokens out each, so whatever the timed pass would compile on a cold
    Triton cache (its prefill chunks, the mixed steps as prompts join running decodes, full decode
    batches) compiles here instead."""
    warm = min(num_requests, engine.config.max_num_seqs)
    prompts = random_prompts(warm, input_lens[:warm], engine.model_config.vocab_size, seed + 1)
    _generate(engine, "warmup", prompts, [min(n, 16) for n in output_lens[:warm]])
    sync(engine)


def _generate(engine, prefix: str, prompts: list[list[int]], output_lens: list[int]) -> int:
    """Add every prompt at once (ids prefix0, prefix1, ...), step until all finish; the tokens made."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", prompt_token_ids=prompt, params=greedy(output_lens[i]))
    generated = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            generated += sum(len(c.token_ids) for c in delta.outputs)
    return generated


def step_until_done(engine) -> tuple[float | None, int, float]:
    """Step `engine` until no request is left: (`time.perf_counter()` when the first token came, None if
    none did; the tokens generated; `time.perf_counter()` at the end). Batch-1 latency is read off these."""
    first: float | None = None
    count = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            new = sum(len(c.token_ids) for c in delta.outputs)
            if new and first is None:
                first = time.perf_counter()
            count += new
    return first, count, time.perf_counter()


def run_latency(
    engine,
    input_len: int,
    output_len: int,
    seed: int = 0,
    repeats: int = 3,
    best_by: Literal["ms_per_token", "ttft_ms"] = "ms_per_token",
) -> LatencyResult:
    """One request at a time (after a warm-up); the best of `repeats` runs (the lowest `best_by`), as the
    engine allows."""
    vocab = engine.model_config.vocab_size
    best: LatencyResult | None = None
    for rep in range(repeats + 1):
        prompt = random_prompts(1, [input_len], vocab, seed + rep)[0]
        sync(engine)
        start = time.perf_counter()
        engine.add_request(f"lat{rep}", prompt_token_ids=prompt, params=greedy(output_len))
        first, count, end = step_until_done(engine)
        if rep == 0 or first is None:
            continue  # the first run warms up
        result = LatencyResult(
            input_len, count, 1000 * (first - start), 1000 * (end - first) / max(count - 1, 1)
        )
        if best is None or getattr(result, best_by) < getattr(best, best_by):
            best = result
    assert best is not None
    return best
