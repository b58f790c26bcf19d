"""`AttentionMetadata`: everything attention needs to find a batch's tokens in the paged KV cache.

The model runner builds one per step and passes it explicitly down the model (no globals).
Layout of a step's batch: the tokens of all scheduled requests are flattened into one ragged
sequence of T tokens, request i owning tokens query_start_loc[i]:query_start_loc[i+1]. Request i's
context after this step is seq_lens[i] tokens; its new tokens sit at positions
seq_lens[i]-q_len_i .. seq_lens[i]-1, so they attend causally to everything before them, cached or new.
"""

from __future__ import annotations

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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        """Every request computes exactly one token this step."""
        return self.max_query_len == 1
