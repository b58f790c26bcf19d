"""The attention tile sweep: `tune_attention` times a few tile shapes around the built-in choice on the
model's real shapes and picks the fastest whose output matches the built-in choice's on every case.

Rules:
- Cases are the model's real head shapes over paged caches whose blocks are scattered, as a long-running
  server's are; small cases cycle through replicas of their KV large enough that L2 cannot hold them, so
  the time is that of reading HBM, as in a model where every layer has its own cache.
- Times are CUDA-event times of a CUDA graph of back-to-back launches: GPU time without host launch cost,
  which is how decode runs in the engine (CUDA graphs) and what prefill's large launches are dominated by.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.tiles import AttentionConfig, CandidateTiming, head_dim_p2

logger = logging.getLogger(__name__)

L2_FLUSH_BYTES = 256 << 20  # more than any current GPU's L2 (H100/H200: 50 MB)

# (query [T, H, D], its metadata) replicas over one (k_cache, v_cache) pool
PagedBatch = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, AttentionMetadata]]]


def tuning_cases(decode: bool, max_context: int, max_tokens: int) -> list[tuple[str, list[int], list[int]]]:
    """(label, new tokens per request, cached tokens per request): decode at batch 1/32/256 over contexts
    of max_context/2 .. max_context; prefill of max_tokens in one and in four prompts, and a quarter of it
    after a cached context."""
    if decode:
        lo = max(1, max_context // 2)
        cases = []
        for batch in (1, 32, 256):
            ctx = [max_context - 1 - (max_context - lo) * i // max(1, batch - 1) for i in range(batch)]
            cases.append((f"decode B={batch}", [1] * batch, [max(0, c) for c in ctx]))
        return cases
    quarter = max(1, max_tokens // 4)
    after = max(0, max_context - quarter)
    return [
        (f"prefill {max_tokens}", [max_tokens], [0]),
        (f"prefill 4x{quarter}", [quarter] * 4, [0] * 4),
        (f"prefill {quarter} after {after}", [quarter], [after]),
    ]


def replicas_for(q_lens: list[int], ctx_lens: list[int], token_bytes: int, calls: int) -> int:
    """How many replicas of a case's KV a timed graph of `calls` launches cycles through."""
    case_bytes = sum(q + c for q, c in zip(q_lens, ctx_lens, strict=True)) * token_bytes
    return max(1, min(calls, math.ceil(L2_FLUSH_BYTES / max(case_bytes, 1))))


def paged_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    copies: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    cache_dtype: torch.dtype | None = None,
) -> PagedBatch:
    """Random K/V in one pool holding `copies` independent replicas of the batch, each request's blocks
    scattered through it (block 0 stays unused: padding entries of a table point at it). The pool is
    `cache_dtype` when given (an fp8 cache: the values cast to e4m3), else `dtype`."""
    device = generator.device
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = copies * sum(per_seq) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator, device=device, dtype=dtype).to(cache_dtype or dtype)
    v_cache = torch.randn(shape, generator=generator, device=device, dtype=dtype).to(cache_dtype or dtype)
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(num_blocks)) + 1
    replicas = []
    used = 0
    for _ in range(copies):
        table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
        for i, n in enumerate(per_seq):
            table[i, :n] = order[used : used + n]
            used += n
        query = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator, device=device, dtype=dtype)
        meta = AttentionMetadata.for_batch(q_lens, seq_lens, table.to(device), block_size)
        replicas.append((query, meta))
    return k_cache, v_cache, replicas


def first_args(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(query, k_cache, v_cache, meta) of the first replica: the positional arguments of paged_attention."""
    k_cache, v_cache, replicas = batch
    query, meta = replicas[0]
    return query, k_cache, v_cache, meta


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives NaN, which fails every bound."""
    out64, ref64 = out.double(), ref.double()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def graph_time_us(
    attention: Callable[..., Any], batch: PagedBatch, scale: float, config: Any, calls: int, repeats: int = 5
) -> float:
    """Median µs per launch of `calls` back-to-back `attention` launches (cycling through the replicas)
    replayed from one CUDA graph, over `repeats` replays timed with CUDA events."""
    k_cache, v_cache, replicas = batch

    def launch_all() -> None:
        for i in range(calls):
            query, meta = replicas[i % len(replicas)]
            attention(query, k_cache, v_cache, meta, scale, config=config)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch_all()  # compiles every variant outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_all()
    graph.replay()
    samples = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(samples)


# Bound on ‖candidate − built-in‖ / ‖built-in‖: the two differ only in summation order and where the
# softmax weights are rounded to the input dtype.
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 5e-3}


@dataclass(slots=True)
class TuneResult:
    decode: AttentionConfig
    prefill: AttentionConfig
    timings: list[CandidateTiming]
    cases: dict[str, list[str]]
    seconds: float


def candidate_configs(default: AttentionConfig, decode: bool) -> list[AttentionConfig]:
    """The built-in choice first, then three neighbours: those the H100 sweep
    (docs/results/2026-11-25-h100/README.md, Tuning) found close to it, which lighter tiles (fewer
    stages, smaller blocks) may beat on GPUs with less shared memory or fewer SMs. Eight warps, block_n
    128 for prefill and pre-transposed keys were slower there and are left out to keep the sweep short."""
    if decode:
        others = [
            replace(default, block_n=max(16, default.block_n // 2)),
            replace(default, block_n=default.block_n * 2),
            replace(default, num_warps=max(1, default.num_warps // 2)),
        ]
    else:
        others = [
            replace(default, num_stages=max(1, default.num_stages - 1)),
            replace(default, block_m=max(16, default.block_m // 2)),
            replace(default, block_n=max(16, default.block_n // 2)),
        ]
    return list(dict.fromkeys([default, *others]))


def tune_attention(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cuda",
    max_context: int = 2048,
    max_tokens: int = 2048,
    log: Callable[[str], None] | None = None,
    kv_cache_dtype: torch.dtype | None = None,
) -> TuneResult:
    """Time `candidate_configs` for decode and prefill on these shapes; per kind the candidate with the
    lowest total time over `tuning_cases` wins (the built-in choice on a tie). A candidate that fails to
    run (e.g. out of shared memory) or whose output differs from the built-in's is recorded and skipped.
    Raises when the built-in choice itself cannot run. `kv_cache_dtype` float8_e4m3fn sweeps over an fp8
    cache (with scales of 1: the tiles' speed does not depend on them), as an fp8-cache engine runs."""
    from kiln.kernels import triton_attention  # imports Triton, which only CUDA machines have

    start = time.perf_counter()
    say = log or logger.info
    gen = torch.Generator(device=torch.device(device)).manual_seed(0)
    cache_dtype = kv_cache_dtype or dtype
    token_bytes = 2 * num_kv_heads * head_dim * torch.empty(0, dtype=cache_dtype).element_size()
    attention = triton_attention.paged_attention
    if kv_cache_dtype is not None:
        ones = torch.ones(1, dtype=torch.float32, device=device)
        attention = functools.partial(attention, k_scale=ones, v_scale=ones)
    heads = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    scale = head_dim**-0.5
    timings: list[CandidateTiming] = []
    chosen: dict[str, AttentionConfig] = {}
    labels: dict[str, list[str]] = {}
    for kind in ("decode", "prefill"):
        decode = kind == "decode"
        calls = 20 if decode else 5  # launches per timed graph
        default = triton_attention.builtin_config(
            decode, head_dim_p2(head_dim), fp8_cache=kv_cache_dtype is not None
        )
        cases = tuning_cases(decode, max_context, max_tokens)
        labels[kind] = [label for label, _, _ in cases]
        batches = [
            paged_batch(
                q_lens,
                ctx_lens,
                replicas_for(q_lens, ctx_lens, token_bytes, calls),
                **heads,
                block_size=block_size,
                dtype=dtype,
                generator=gen,
                cache_dtype=kv_cache_dtype,
            )
            for _, q_lens, ctx_lens in cases
        ]
        expected = [attention(*first_args(b), scale, config=default) for b in batches]
        best, best_total = default, math.inf
        for config in candidate_configs(default, decode):
            timing = CandidateTiming(kind, config)
            try:
                for (label, _, _), batch, want in zip(cases, batches, expected, strict=True):
                    err = rel_error(attention(*first_args(batch), scale, config=config), want)
                    if not err <= TOLERANCE[dtype]:  # NaN fails too
                        raise ValueError(f"{label}: output differs from the built-in choice's by {err:.1e}")
                    timing.case_us.append(graph_time_us(attention, batch, scale, config, calls))
                timing.total_us = sum(timing.case_us)
            except Exception as exc:  # a tile shape this GPU cannot run, or a wrong result: it cannot win
                timing.case_us, timing.error = [], f"{type(exc).__name__}: {exc}"[:400]
            timings.append(timing)
            outcome = f"{timing.total_us:.1f} us" if timing.total_us is not None else timing.error
            say(f"{kind} {config}: {outcome}")
            if timing.total_us is not None and timing.total_us < best_total:
                best, best_total = config, timing.total_us
        chosen[kind] = best
        del batches, expected
        torch.cuda.empty_cache()
    return TuneResult(chosen["decode"], chosen["prefill"], timings, labels, time.perf_counter() - start)
