"""CUDA graphs: the whole model forward replayed as one launch per step.

A forward pass launches ~10 kernels per layer from Python, each costing the host far more than the GPU
needs for it at small sizes (Triton's launcher alone tens of microseconds): eager, a 7B model's batch-1
decode step or 128-token prefill takes ~25 ms of host time for ~6 ms of GPU work. `BucketedGraphs`
captures one graph per bucket and runs a step in the smallest bucket that holds it; a `GraphLayout`
says which steps, which buckets, and how the padding past the real tokens is made harmless:

- `DecodeLayout`, one graph per bucketed batch size: a step of n decodes runs the smallest bucket >= n,
  the extra rows padded as harmless dummy decodes (slot -1: no KV is written; context length 1 over a
  block their table row already holds, so every read stays inside the cache). Where attention's
  decode tile depends on the longest context, one family of these graphs per length class: a step
  replays the family of the shortest class that holds its longest context.
- `PrefillLayout`, one graph per bucketed token count, for a step that computes T > 1 tokens of ONE
  request (a prompt arriving at an idle engine: its time to first token). The T real tokens run in the
  smallest bucket >= T, the padding tokens after them with slot -1 (not stored) and outside the
  request's query range (query_start_loc[1] == T), so attention gives them zeros and no one reads them.

Rules: the static input buffers are the only way in, the captured output tensor the only way out;
capture happens once, after the KV cache is allocated; the attention split count and the host-side
shapes (the bucket's token count, the longest context) are fixed per graph, so a graph is valid for
every context length up to the longest it was captured with (max_model_len unless its layout says
less), cached prefix or not.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from collections.abc import Callable, Container, Iterator
from typing import Protocol, TypeVar

import torch

from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

Captured = TypeVar("Captured")


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes) | {max_batch_size})


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 16 up to max_tokens (included, whatever it is)."""
    sizes = [16 << i for i in range(12) if 16 << i < max_tokens]
    return sorted(set(sizes) | {max_tokens})


def capture_graph(
    forward: Callable[[], torch.Tensor], pool: tuple[int, int], stream: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `forward` once on the side `stream` (every kernel compiled and warmed outside the capture),
    then capture one call of it, on the same stream, into the memory `pool`; returns the graph and its
    output tensor. Calls `CUDAGraph.capture_begin` itself rather than entering `torch.cuda.graph`,
    whose per-capture device sync and `empty_cache` would hand the warm-up's blocks back to the driver
    only for the next warm-up to allocate them again: hundreds of times with piecewise graphs."""
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        forward()  # one warm-up is enough: later calls of a kernel allocate and compile nothing
        graph.capture_begin(pool=pool)
        try:
            output = forward()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, output


@contextlib.contextmanager
def capture_session() -> Iterator[None]:
    """Around a run of captures: garbage is collected and the allocator's cache emptied once, then the
    cyclic collector stays off until the run ends (restored as it was), so no collection walks the heap
    mid-capture or finalizes an object (a Triton kernel's module) that a capture is using."""
    gc.collect()
    torch.cuda.empty_cache()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture_largest_first(
    buckets: list[int],
    capture: Callable[[int, tuple[int, int], torch.cuda.Stream], Captured],
    pool: tuple[int, int] | None,
    into: dict[int, Captured],
) -> None:
    """Capture every bucket into `into` (each as soon as it is done), largest first, so smaller graphs
    reuse the memory the largest one reserved in `pool` (a graph memory pool to share; one is made if
    None). `capture(size, pool, stream)` captures one bucket."""
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    with capture_session():
        for size in reversed(buckets):
            into[size] = capture(size, pool, stream)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-ups' blocks: the graphs hold theirs in `pool`


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


class GraphLayout(Protocol):
    """What one family of bucketed graphs fixes: the buckets (step sizes in tokens), the static
    attention-metadata buffers, the metadata a bucket is captured with, and how a step's metadata is
    loaded into those buffers before a replay, padding included."""

    name: str  # in logs and errors
    buckets: list[int]
    device: torch.device

    def covers(self, meta: AttentionMetadata) -> bool:
        """Whether a step of this shape (its token count aside) can replay these graphs."""
        ...

    def capture_metadata(self, slot_mapping: torch.Tensor, size: int) -> AttentionMetadata:
        """Set the buffers up for capturing bucket `size`; returns the metadata it captures, viewing
        the buffers (and `slot_mapping`, the token buffers' first `size` slots)."""
        ...

    def load(self, meta: AttentionMetadata, num_tokens: int, size: int) -> None:
        """Load a step's metadata for its `num_tokens` real tokens, run in bucket `size`."""
        ...


class DecodeLayout:
    """n decodes of one token each in the smallest batch bucket >= n; the rows past them are dummy
    decodes: context length 1 (over the block their table row last held, block 0 until a larger step
    wrote it; a valid block either way) and slot -1 from `TokenBuffers`, so they write nothing.
    `max_seq_len` (default max_model_len): the longest context its graphs serve; the graphs are
    captured with it, so attention picks its split count and tile for that length
    (`kiln.kernels.attention_plan.decode_context_bounds` says where the tile changes)."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        max_seq_len: int | None = None,
    ) -> None:
        self.buckets = batch_buckets(max_batch_size)
        self.device = device
        self.max_seq_len = max_model_len if max_seq_len is None else min(max_seq_len, max_model_len)
        self.name = (
            "decode" if self.max_seq_len == max_model_len else f"decode (contexts <= {self.max_seq_len})"
        )
        self.block_size = block_size
        n = self.buckets[-1]
        max_blocks = -(-max_model_len // block_size)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)

    def covers(self, meta: AttentionMetadata) -> bool:
        return meta.max_query_len == 1 and meta.max_seq_len <= self.max_seq_len

    def capture_metadata(self, slot_mapping: torch.Tensor, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_seq_len,  # fixes the split count and tile for the longest context
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[self.max_seq_len] * size,
            block_size=self.block_size,
        )

    def load(self, meta: AttentionMetadata, num_tokens: int, size: int) -> None:
        width = meta.block_tables.shape[1]
        self.seq_lens[:num_tokens].copy_(meta.seq_lens)
        self.seq_lens[num_tokens:size].fill_(1)
        self.block_tables[:num_tokens, :width].copy_(meta.block_tables)


class PrefillLayout:
    """One request's T tokens in the smallest token bucket >= T; the tokens past them lie outside its
    query range (query_start_loc[1] == T), so attention gives them zeros."""

    name = "single-request prefill"

    def __init__(self, *, max_tokens: int, max_model_len: int, block_size: int, device: torch.device) -> None:
        self.buckets = token_buckets(max_tokens)
        self.device = device
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.query_start_loc = torch.zeros(2, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            (1, -(-max_model_len // block_size)), dtype=torch.int32, device=device
        )

    def covers(self, meta: AttentionMetadata) -> bool:
        return meta.num_seqs == 1

    def capture_metadata(self, slot_mapping: torch.Tensor, size: int) -> AttentionMetadata:
        # Captured as a prompt of `size` tokens with no cache (slots -1: nothing is written).
        self.query_start_loc[1] = size
        self.seq_lens[0] = size
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=size,  # the tiles of the whole bucket; those past the real tokens exit at once
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=[0, size],
            seq_lens_cpu=[self.max_model_len],
            block_size=self.block_size,
        )

    def load(self, meta: AttentionMetadata, num_tokens: int, size: int) -> None:
        width = meta.block_tables.shape[1]
        self.query_start_loc.copy_(meta.query_start_loc)
        self.seq_lens.copy_(meta.seq_lens)
        self.block_tables[:, :width].copy_(meta.block_tables)


class BucketedGraphs:
    """One whole-forward graph per bucket of `layout` (see the module docstring)."""

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], layout: GraphLayout
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.layout = layout
        self.buckets = layout.buckets
        self.tokens = TokenBuffers(self.buckets[-1], layout.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _capture_bucket(
        self, size: int, pool: tuple[int, int], stream: torch.cuda.Stream
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = self.layout.capture_metadata(self.tokens.slot_mapping[:size], size)
        return capture_graph(self.tokens.forward(self.model, self.kv_caches, meta, size), pool, stream)

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Capture every bucket; `pool`: a graph memory pool to share (one is made if None)."""
        capture_largest_first(self.buckets, self._capture_bucket, pool, self._graphs)
        logger.info("captured %s CUDA graphs for %s tokens", self.layout.name, self.buckets)

    def bucket_for(self, num_tokens: int) -> int | None:
        return smallest_bucket(self.buckets, self._graphs, num_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph for this step; returns hidden states [T, H] (a view of the graph's output,
        valid until the next replay)."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None or not self.layout.covers(meta):
            raise ValueError(
                f"no {self.layout.name} graph for a step of {meta.num_seqs} requests and {n} tokens"
                f" (longest query {meta.max_query_len})"
            )
        self.tokens.load(input_ids, positions, meta.slot_mapping, size)
        self.layout.load(meta, n, size)
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:n]
