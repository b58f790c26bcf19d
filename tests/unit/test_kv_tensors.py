"""KV cache device tensors: bytes per block, blocks per budget, and one contiguous zeroed allocation."""

from __future__ import annotations

import pytest
import torch

from kiln.config import ModelConfig
from kiln.kvcache.tensors import allocate_kv_cache, kv_bytes_per_block, num_blocks_for_budget


def _config(layers: int = 3, kv_heads: int = 2, head_dim: int = 8) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=128,
    )


def test_bytes_per_block_counts_k_and_v_of_every_layer() -> None:
    config = _config()
    # 2 (K, V) * 3 layers * 4 tokens * 2 heads * 8 dims = 384 elements.
    assert kv_bytes_per_block(config, 4, torch.float32) == 384 * 4
    assert kv_bytes_per_block(config, 4, torch.float16) == 384 * 2
    assert kv_bytes_per_block(config, 4, torch.bfloat16) == 384 * 2
    assert kv_bytes_per_block(config, 16, torch.float16) == 4 * 384 * 2
    # Llama-3-8B: 32 layers, 8 KV heads of 128, block 16, fp16 -> 2 MiB per block.
    llama3 = _config(layers=32, kv_heads=8, head_dim=128)
    assert kv_bytes_per_block(llama3, 16, torch.float16) == 2 * 1024 * 1024
    with pytest.raises(ValueError):
        kv_bytes_per_block(config, 0, torch.float16)


def test_num_blocks_for_budget_rounds_down() -> None:
    config = _config()
    per_block = kv_bytes_per_block(config, 4, torch.float16)
    assert num_blocks_for_budget(10 * per_block, config, 4, torch.float16) == 10
    assert num_blocks_for_budget(10 * per_block + per_block - 1, config, 4, torch.float16) == 10
    assert num_blocks_for_budget(per_block - 1, config, 4, torch.float16) == 0
    assert num_blocks_for_budget(0, config, 4, torch.float16) == 0
    assert num_blocks_for_budget(-5, config, 4, torch.float16) == 0


def test_allocate_kv_cache_shapes_dtype_and_zeros() -> None:
    config = _config()
    caches = allocate_kv_cache(config, 5, 4, torch.float16, "cpu")
    assert len(caches) == config.num_hidden_layers
    for k_cache, v_cache in caches:
        for cache in (k_cache, v_cache):
            assert cache.shape == (5, 4, 2, 8)
            assert cache.dtype == torch.float16
            assert cache.device.type == "cpu"
            assert cache.is_contiguous()
            assert torch.count_nonzero(cache) == 0


def test_allocate_kv_cache_is_one_allocation_of_disjoint_views() -> None:
    config = _config()
    num_blocks, block_size, dtype = 5, 4, torch.float32
    caches = allocate_kv_cache(config, num_blocks, block_size, dtype, torch.device("cpu"))
    tensors = [t for pair in caches for t in pair]
    storage = tensors[0].untyped_storage()
    assert all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors)
    # The one allocation is exactly what the budget math promised.
    assert storage.nbytes() == num_blocks * kv_bytes_per_block(config, block_size, dtype)
    # Views do not overlap: writing one leaves every other untouched.
    caches[1][0].fill_(1.0)
    sums = [float(t.sum()) for t in tensors]
    assert sums == [0.0, 0.0, float(caches[1][0].numel()), 0.0, 0.0, 0.0]
    # Slot s of a layer is block s // block_size, offset s % block_size.
    v_cache = caches[2][1]
    v_cache.view(-1, 2, 8)[9] = 7.0
    assert torch.all(v_cache[2, 1] == 7.0)


def test_allocate_kv_cache_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError):
        allocate_kv_cache(_config(), 0, 4, torch.float16, "cpu")
    with pytest.raises(ValueError):
        allocate_kv_cache(_config(), 4, 0, torch.float16, "cpu")


def test_kv_blocks_from_memory_on_cpu_follow_the_budget_and_the_cap() -> None:
    from kiln.config import EngineConfig
    from kiln.engine.memory_profile import CPU_KV_BUDGET_BYTES, num_kv_blocks_from_memory
    from kiln.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(_config())  # float32 on CPU
    per_block = kv_bytes_per_block(model.config, 4, torch.float32)
    given = EngineConfig(kv_cache_memory_bytes=7 * per_block + 1)
    assert num_kv_blocks_from_memory(model, given, 4, 64, 8, cap=100) == 7
    assert num_kv_blocks_from_memory(model, given, 4, 64, 8, cap=5) == 5
    default = num_kv_blocks_from_memory(model, EngineConfig(), 4, 64, 8, cap=10**9)
    assert default == CPU_KV_BUDGET_BYTES // per_block
    with pytest.raises(ValueError, match="no memory left"):
        num_kv_blocks_from_memory(model, EngineConfig(kv_cache_memory_bytes=per_block - 1), 4, 64, 8, cap=9)
