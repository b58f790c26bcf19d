"""The KV cache's device memory: how big a block is, how many fit a budget, and the tensors themselves.

Layout: one (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_key_value_heads,
head_dim], so token slot s = block_id * block_size + offset of a layer is k_cache.view(-1, H, D)[s].
All pairs are views into ONE contiguous zeroed allocation: a single allocation does not fragment the
allocator, and its size is exactly what the budget math promised. Zeroed so padding slots never
hold NaNs that a masked-out attention score could still multiply.
"""

from __future__ import annotations

import math
import mmap

import torch

from kiln.config import ModelConfig


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across K and V of all layers."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    elements = 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim
    return elements * dtype.itemsize


def num_blocks_for_budget(budget_bytes: int, config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """How many whole blocks fit in budget_bytes (0 when not even one does; the caller decides if that is
    an error, since only it knows the smallest cache it can serve with)."""
    if budget_bytes <= 0:
        return 0
    return budget_bytes // kv_bytes_per_block(config, block_size, dtype)


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed K and V caches for every layer, [num_blocks, block_size, kv_heads, head_dim] each, carved
    from one contiguous allocation of num_blocks * kv_bytes_per_block bytes."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    shape = (
        config.num_hidden_layers,
        2,
        num_blocks,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
    )
    if torch.device(device).type == "cpu":
        # An anonymous mmap is zero pages the OS maps on first touch, so a 1 GiB cache costs nothing at
        # start-up (torch.zeros writes every byte: 0.2-0.8 s on the 2-core CPU machine). Not numpy's
        # zeros: numpy madvises large arrays for huge pages, and the first write to each layer's K and
        # V then faulted in a zeroed 2 MiB page: ~0.3 s in the first request's step.
        nbytes = math.prod(shape) * dtype.itemsize
        storage = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)
    else:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    # storage[layer, 0] is contiguous: the layer and K/V axes come first, so each view is one slab.
    return [(storage[layer, 0], storage[layer, 1]) for layer in range(config.num_hidden_layers)]
