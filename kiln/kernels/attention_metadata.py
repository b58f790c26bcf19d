"""`AttentionMetadata`: everything attention needs to find a batch's tokens in the paged KV cache.

The model runner builds one per step and passes it explicitly down the model (no globals).
Layout of a step's batch: the tokens of all scheduled requests are flattened into one ragged
sequence of T tokens, request i owning tokens query_start_loc[i]:query_start_loc[i+1]. Request i's
context after this step is seq_lens[i] tokens; its new tokens sit at positions
seq_lens[i]-q_len_i .. seq_lens[i]-1, so they attend causally to everything before them, cached or new.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    # [T] int64: cache slot (block_id * block_size + offset) where each token's K/V is written;
    # -1 for padding tokens (CUDA-graph batches), which are neither stored nor attended.
    slot_mapping: torch.Tensor
    # [B + 1] int32: cumulative query lengths, query_start_loc[0] == 0.
    query_start_loc: torch.Tensor
    # [B] int32: context length of each request after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # [B, max_blocks_per_seq] int32: each request's block ids in order, padded with 0.
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies, so the reference path and kernel selection never sync with the device.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @classmethod
    def one_prompt(cls, num_tokens: int, block_size: int, device: torch.device | str) -> AttentionMetadata:
        """A prefill of one sequence of `num_tokens` tokens from position 0, stored in blocks 0, 1, ... in
        order (a cache of at least ceil(num_tokens / block_size) blocks): profiling, calibration, scoring."""
        num_blocks = -(-num_tokens // block_size)
        return cls(
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
            query_start_loc_cpu=[0, num_tokens],
            seq_lens_cpu=[num_tokens],
            block_size=block_size,
        )

    @classmethod
    def for_batch(
        cls,
        q_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: torch.Tensor,
        block_size: int,
        slot_mapping: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        """Requests of these query lengths and context lengths (cached + new), whose blocks are the rows of
        `block_tables` (int32, on the batch's device): tests, benchmarks and tile sweeps. `slot_mapping`
        None: zeros, for attention alone, which never reads it (the KV store does)."""
        device = block_tables.device
        starts = [0, *itertools.accumulate(q_lens)]
        seq_lens = list(seq_lens)
        if slot_mapping is None:
            slot_mapping = torch.zeros(starts[-1], dtype=torch.int64, device=device)
        return cls(
            slot_mapping=slot_mapping,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=block_tables,
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_size=block_size,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_leading_decodes(self) -> int:
        """How many requests at the batch's start compute one token each (the scheduler puts running
        requests, most of them decoding, before the prompts it admits). O(log B): query_start_loc[i] - i
        never decreases, and is 0 exactly up to the first request of more than one token."""
        starts = self.query_start_loc_cpu
        return bisect.bisect_right(range(len(starts)), 0, key=lambda i: starts[i] - i) - 1

    @property
    def is_pure_decode(self) -> bool:
        """Every request computes exactly one token this step."""
        return self.max_query_len == 1
