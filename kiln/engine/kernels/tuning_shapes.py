"""The attention tuning sweep's workload and timer (kiln.engine.kernels.tuning.tune_attention).

Rules:
- Cases are the model's real head shapes over paged caches whose blocks are scattered, as a long-running
  server's are; small cases cycle through replicas of their KV large enough that L2 cannot hold them, so
  the time is that of reading HBM, as in a model where every layer has its own cache.
- Times are CUDA-event times of a CUDA graph of back-to-back launches: GPU time without host launch cost,
  which is how decode runs in the engine (CUDA graphs) and what prefill's large launches are dominated by.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

from kiln.engine.attention_metadata import AttentionMetadata

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
) -> PagedBatch:
    """Random K/V in one pool holding `copies` independent replicas of the batch, each request's blocks
    scattered through it (block 0 stays unused: padding entries of a table point at it)."""
    device = generator.device
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = copies * sum(per_seq) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(num_blocks)) + 1
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    replicas = []
    used = 0
    for _ in range(copies):
        table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
        for i, n in enumerate(per_seq):
            table[i, :n] = order[used : used + n]
            used += n
        query = torch.randn(starts[-1], num_heads, head_dim, generator=generator, device=device, dtype=dtype)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_size=block_size,
        )
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
