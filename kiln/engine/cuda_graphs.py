"""CUDA graphs: the whole model forward replayed as one launch per step.

A forward pass launches ~10 kernels per layer from Python, each costing the host far more than the GPU
needs for it at small sizes (Triton's launcher alone tens of microseconds): eager, a 7B model's batch-1
decode step or 128-token prefill takes ~25 ms of host time for ~6 ms of GPU work. Two kinds of graphs:

- `DecodeGraphs`, one per bucketed batch size: a step of n decodes runs the smallest bucket >= n, the
  extra rows padded as harmless dummy decodes (slot -1: no KV is written; context length 1 over block 0).
- `PrefillGraphs`, one per bucketed token count, for a step that computes T > 1 tokens of ONE request
  (a prompt arriving at an idle engine: its time to first token). The T real tokens run in the
  smallest bucket >= T, the padding tokens after them with slot -1 (not stored) and outside the
  request's query range (query_start_loc[1] == T), so attention gives them zeros and no one reads them.

Rules: the static input buffers are the only way in, the captured output tensor the only way out;
capture happens once, after the KV cache is allocated; the attention split count and the host-side
shapes (the bucket's token count, the longest context) are fixed per graph, so a graph is valid for
every context length up to max_model_len, cached prefix or not.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Container

import torch

from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes) | {max_batch_size})


def capture_graph(
    forward: Callable[[], torch.Tensor], pool: tuple[int, int], stream: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `forward` once on the side `stream` (every kernel compiled and warmed outside the capture),
    then capture one call of it into the memory `pool`; returns the graph and its output tensor."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # one warm-up is enough: later calls of a kernel allocate and compile nothing
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output


def smallest_bucket(buckets: list[int], captured: Container[int], size: int) -> int | None:
    """The smallest bucket >= size, if its graph was captured."""
    for bucket in buckets:
        if bucket >= size:
            return bucket if bucket in captured else None
    return None


class TokenBuffers:
    """A graph's per-token static inputs: token ids, positions and KV-cache slots. Padding tokens past
    the real ones get slot -1, so their K/V is never stored; they keep the ids and positions of an
    earlier step (valid values, and nothing reads what they compute)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)

    def load(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, bucket: int
    ) -> None:
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)

    def forward(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        size: int,
    ) -> Callable[[], torch.Tensor]:
        """The model's forward over the first `size` buffered tokens, as a call to capture."""
        return functools.partial(model, self.input_ids[:size], self.positions[:size], kv_caches, meta)


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_batch_size: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch_size)
        n = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        self.tokens = TokenBuffers(n, device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.tokens.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixes the split count for the longest context
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[self.max_model_len] * size,
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Capture every bucket; `pool`: a graph memory pool to share (one is made if None)."""
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        # Largest first, so smaller graphs reuse the memory pool the largest one reserved.
        for size in reversed(self.buckets):
            forward = self.tokens.forward(self.model, self.kv_caches, self._metadata(size), size)
            self._graphs[size] = capture_graph(forward, pool, stream)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket_for(self, num_seqs: int) -> int | None:
        return smallest_bucket(self.buckets, self._graphs, num_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph for this pure-decode step; returns hidden states [n, H] (a view of the
        graph's output, valid until the next replay)."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None or meta.max_query_len != 1:
            raise ValueError(f"no decode graph for a step of {n} tokens (max query {meta.max_query_len})")
        width = meta.block_tables.shape[1]
        self.tokens.load(input_ids, positions, meta.slot_mapping, size)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].fill_(1)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:n]


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 16 up to max_tokens (included, whatever it is)."""
    sizes = [16 << i for i in range(12) if 16 << i < max_tokens]
    return sorted(set(sizes) | {max_tokens})


class PrefillGraphs:
    """Graphs for single-request steps of 2..max_tokens tokens (see the module docstring)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_tokens: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = token_buckets(max_tokens)
        n = self.buckets[-1]
        self.tokens = TokenBuffers(n, device)
        self.query_start_loc = torch.zeros(2, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            (1, -(-max_model_len // block_size)), dtype=torch.int32, device=device
        )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.tokens.slot_mapping[:size],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=size,  # the tiles of the whole bucket; those past the real tokens exit at once
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=[0, size],
            seq_lens_cpu=[self.max_model_len],
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> None:
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.buckets):
            # Capture as a prompt of `size` tokens with no cache (slots -1: nothing is written).
            self.query_start_loc[1] = size
            self.seq_lens[0] = size
            forward = self.tokens.forward(self.model, self.kv_caches, self._metadata(size), size)
            self._graphs[size] = capture_graph(forward, pool, stream)
        torch.cuda.synchronize()
        logger.info("captured single-request prefill CUDA graphs for %s tokens", self.buckets)

    def bucket_for(self, num_tokens: int) -> int | None:
        return smallest_bucket(self.buckets, self._graphs, num_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph for this one-request step; returns hidden states [T, H] (a view of the
        graph's output, valid until the next replay)."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None or meta.num_seqs != 1:
            raise ValueError(f"no prefill graph for a step of {meta.num_seqs} requests and {n} tokens")
        width = meta.block_tables.shape[1]
        self.tokens.load(input_ids, positions, meta.slot_mapping, size)
        self.query_start_loc.copy_(meta.query_start_loc)
        self.seq_lens.copy_(meta.seq_lens)
        self.block_tables[:, :width].copy_(meta.block_tables)
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:n]
