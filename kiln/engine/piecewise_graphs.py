"""Piecewise CUDA graphs: any mix of prefills and decodes, with attention run eagerly between graphs.

A step that mixes prefill chunks into decodes cannot use the decode or single-request prefill graphs,
and eagerly it launches ~10 kernels per layer from Python: ~25 ms of host time on a 7B model, against
~10 ms of GPU work for 256 decodes. Under a steady stream of arrivals nearly every step is such a step.
Attention is the only operation that reads per-request metadata (query ranges, context lengths,
block tables, and a grid sized from them); everything between two attentions works token by token
(`LlamaForCausalLM.piece`). So each piece is captured once per token bucket, and a step
replays L + 1 graphs with L eager attention launches between them. Steps of more than
`MAX_PIECEWISE_GRAPH_TOKENS` run eagerly.

Rules: the T real tokens run in the smallest bucket >= T; padding tokens have slot -1 (their K/V is not
stored, see `TokenBuffers`) and attention gives them zeros, so nothing a real token computes depends
on them. Pieces pass data through static buffers only (the query, the attention output and the
residual stream), each piece writing its results into them at its end; the last piece's output tensor
is the step's hidden states. Replays of one bucket run in piece order, which is also the capture order,
so the pieces may share one memory pool.
"""

from __future__ import annotations

import functools
import logging

import torch

from kiln.engine.cuda_graphs import TokenBuffers, capture_graph, capture_largest_first, smallest_bucket
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Steps of more tokens than this run eagerly: their GPU work (~30 ms for 1,024 tokens of an 8B model)
# outlasts the ~25 ms the host needs to launch them, so a graph would save nothing.
MAX_PIECEWISE_GRAPH_TOKENS = 1024


def mixed_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then every 64 up to max_tokens (included). A mixed step is the running
    decodes plus a few prompt chunks, any count in between, so the buckets are fine-grained where the
    padding would otherwise be a large share of a step."""
    sizes = [s for s in (16, 32, 64) if s < max_tokens] + list(range(128, max_tokens, 64))
    return sorted(set(sizes) | {max_tokens})


class PiecewiseGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_tokens: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = mixed_buckets(max_tokens)
        n = self.buckets[-1]
        config = model.config
        dtype = next(model.parameters()).dtype
        self.tokens = TokenBuffers(n, device)
        heads = (n, config.num_attention_heads, config.head_dim)
        self.query = torch.zeros(heads, dtype=dtype, device=device)
        self.attended = torch.zeros(heads, dtype=dtype, device=device)
        self.residual = torch.zeros((n, config.hidden_size), dtype=dtype, device=device)
        # bucket -> one graph per piece, and the last piece's output (the step's hidden states)
        self._graphs: dict[int, tuple[list[torch.cuda.CUDAGraph], torch.Tensor]] = {}

    def _piece(self, index: int, size: int) -> torch.Tensor:
        """Run piece `index` on the static buffers; returns its first output. Every piece but the last
        leaves the query and the residual stream in their buffers for what follows."""
        output, residual = self.model.piece(
            index,
            self.tokens.positions[:size],
            self.kv_caches,
            self.tokens.slot_mapping[:size],
            self.attended[:size] if index else None,
            self.residual[:size] if index else None,
            input_ids=self.tokens.input_ids[:size] if index == 0 else None,
        )
        if index < self.model.num_pieces - 1:
            self.query[:size].copy_(output)
            self.residual[:size].copy_(residual)
        return output

    def _capture_bucket(
        self, size: int, pool: tuple[int, int], stream: torch.cuda.Stream
    ) -> tuple[list[torch.cuda.CUDAGraph], torch.Tensor]:
        pieces = [
            capture_graph(functools.partial(self._piece, index, size), pool, stream)
            for index in range(self.model.num_pieces)
        ]
        return [graph for graph, _ in pieces], pieces[-1][1]

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Capture every bucket's pieces; `pool`: a graph memory pool to share (one is made if None)."""
        capture_largest_first(self.buckets, self._capture_bucket, pool, self._graphs)
        logger.info("captured piecewise CUDA graphs for %s tokens", self.buckets)

    def bucket_for(self, num_tokens: int) -> int | None:
        return smallest_bucket(self.buckets, self._graphs, num_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The forward of any step of at most the largest bucket's tokens; returns hidden states [T, H]
        (a view of a graph's output, valid until the next replay)."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None:
            raise ValueError(f"no piecewise graph for a step of {n} tokens")
        self.tokens.load(input_ids, positions, meta.slot_mapping, size)
        graphs, output = self._graphs[size]
        layers = self.model.model.layers
        for index, graph in enumerate(graphs):
            graph.replay()
            if index < len(layers):
                # Attention reads the step's own metadata; its rows past the real tokens come out zero.
                attended = layers[index].self_attn.attend(self.query[:size], self.kv_caches[index], meta)
                self.attended[:size].copy_(attended)
        return output[:n]
