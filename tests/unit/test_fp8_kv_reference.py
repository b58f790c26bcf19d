"""The fp8 KV cache's PyTorch references (the CPU path and the definition the Triton kernels must match),
the kernel dispatch's checks of the scales, and the KV budget maths of a 1-byte cache."""

from __future__ import annotations

import pytest
import torch

from kiln import kernels
from kiln.config import EngineConfig, KVCacheConfig, ModelConfig
from kiln.engine.memory_profile import num_kv_blocks_from_memory
from kiln.kernels import reference
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kvcache.tensors import allocate_kv_cache, kv_bytes_per_block, num_blocks_for_budget
from kiln.models.llama import LlamaForCausalLM

FP8 = torch.float8_e4m3fn
CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)


def test_round_trip_error_is_within_half_an_e4m3_step() -> None:
    """x -> e4m3(x / s) -> stored * s: relative error <= 2^-4 (3 mantissa bits, round to nearest) in the
    normal range, absolute error <= s * 2^-10 (half the subnormal step 2^-9) below it, and values past
    448 * s saturate there."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-4, 1, 4096)
    scale = torch.tensor([x.abs().max().item() / 448])
    back = reference.dequantize_kv(reference.quantize_kv(x, scale), scale)
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    assert (back - x).abs().max() > 0  # it does round
    big = torch.tensor([1e6, -1e6, 448.0 * 3])
    assert reference.dequantize_kv(
        reference.quantize_kv(big, torch.tensor([3.0])), torch.tensor([3.0])
    ).tolist() == [
        1344.0,
        -1344.0,
        1344.0,
    ]
    # bf16 / fp16 input quantizes as its exact float32 value
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        assert torch.equal(
            reference.quantize_kv(low, scale).view(torch.uint8),
            reference.quantize_kv(low.float(), scale).view(torch.uint8),
        )


def test_store_kv_quantizes_into_the_slots_and_skips_padding() -> None:
    gen = torch.Generator().manual_seed(1)
    key, value = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    k_cache, v_cache = torch.zeros(3, 4, 2, 8, dtype=FP8), torch.zeros(3, 4, 2, 8, dtype=FP8)
    k_scale, v_scale = torch.tensor([0.01]), torch.tensor([0.002])
    slots = torch.tensor([5, 0, -1, 11, 6])
    kernels.store_kv(key, value, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(
            flat_k[slot].view(torch.uint8), reference.quantize_kv(key[token], k_scale).view(torch.uint8)
        )
        assert torch.equal(
            flat_v[slot].view(torch.uint8), reference.quantize_kv(value[token], v_scale).view(torch.uint8)
        )
    untouched = [s for s in range(12) if s not in (5, 0, 11, 6)]
    assert (flat_k[untouched].float() == 0).all() and (flat_v[untouched].float() == 0).all()


def _batch(gen: torch.Generator, dtype: torch.dtype) -> tuple:
    """A prefill chunk after a cached prefix, a decode and a fresh prompt, over shuffled blocks."""
    q_lens, contexts, block_size = [3, 1, 6], [9, 20, 0], 4
    seq_lens = [q + c for q, c in zip(q_lens, contexts, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    order = (torch.randperm(sum(blocks_per_seq), generator=gen) + 1).tolist()
    tables = torch.zeros(3, max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor(order[used : used + n])
        used += n
    num_blocks = used + 1
    k = torch.randn(num_blocks, block_size, 2, 8, generator=gen) * 3
    v = torch.randn(num_blocks, block_size, 2, 8, generator=gen)
    query = torch.randn(sum(q_lens), 4, 8, generator=gen).to(dtype)
    meta = AttentionMetadata.for_batch(q_lens, seq_lens, tables, block_size)
    return query, k, v, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_over_an_fp8_cache_is_attention_over_the_dequantized_cache(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    query, k, v, meta = _batch(gen, dtype)
    k_scale, v_scale = torch.tensor([k.abs().max().item() / 448]), torch.tensor([v.abs().max().item() / 448])
    k8, v8 = reference.quantize_kv(k, k_scale), reference.quantize_kv(v, v_scale)
    out = kernels.paged_attention(query, k8, v8, meta, 8**-0.5, k_scale=k_scale, v_scale=v_scale)
    # the dequantized cache in float32 (exact) and in the query's dtype (as a 16-bit cache would hold it)
    k32, v32 = reference.dequantize_kv(k8, k_scale), reference.dequantize_kv(v8, v_scale)
    exact = reference.paged_attention(query, k32, v32, meta, 8**-0.5)
    assert out.dtype == dtype and torch.equal(out, exact)
    as_16 = reference.paged_attention(query, k32.to(dtype), v32.to(dtype), meta, 8**-0.5)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), as_16.float(), rtol=tolerance, atol=tolerance)
    # and close to attention over the unquantized cache: e4m3 costs a few percent, not more
    unquantized = reference.paged_attention(query.float(), k, v, meta, 8**-0.5)
    error = (out.float() - unquantized).norm() / unquantized.norm()
    assert 0 < error < 0.08, error


def test_the_dispatch_refuses_an_fp8_cache_without_scales_and_scales_without_one() -> None:
    gen = torch.Generator().manual_seed(3)
    query, k, v, meta = _batch(gen, torch.float32)
    k8, v8 = k.to(FP8), v.to(FP8)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="fp8 KV cache needs its k_scale and v_scale"):
        kernels.paged_attention(query, k8, v8, meta, 0.3)
    with pytest.raises(ValueError, match="fp8 KV cache needs its k_scale and v_scale"):
        kernels.paged_attention(query, k8, v8, meta, 0.3, k_scale=one)
    with pytest.raises(ValueError, match="apply to an fp8 KV cache only"):
        kernels.paged_attention(query, k, v, meta, 0.3, k_scale=one, v_scale=one)
    with pytest.raises(ValueError, match="per-tensor: one value each"):
        kernels.paged_attention(query, k8, v8, meta, 0.3, k_scale=torch.ones(2), v_scale=one)
    key = torch.randn(2, 2, 8)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="fp8 KV cache needs"):
        kernels.store_kv(key, key, k8, v8, slots)
    with pytest.raises(ValueError, match="apply to an fp8 KV cache only"):
        kernels.store_kv(key, key, k, v, slots, k_scale=one, v_scale=one)
    table = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="fp8 KV cache needs"):
        kernels.rotary_store_kv(
            torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 8), key, key, table, k8, v8, slots
        )


def test_rotary_store_kv_quantizes_the_rotated_key() -> None:
    gen = torch.Generator().manual_seed(4)
    q, key, value = (
        torch.randn(3, 4, 8, generator=gen),
        torch.randn(3, 2, 8, generator=gen),
        torch.randn(3, 2, 8, generator=gen),
    )
    table = torch.randn(16, 8, generator=gen)
    positions, slots = torch.tensor([3, 7, 1]), torch.tensor([2, 0, 5])
    k8, v8 = torch.zeros(2, 4, 2, 8, dtype=FP8), torch.zeros(2, 4, 2, 8, dtype=FP8)
    scales = {"k_scale": torch.tensor([0.05]), "v_scale": torch.tensor([0.01])}
    q_out = kernels.rotary_store_kv(positions, q, key, value, table, k8, v8, slots, **scales)
    q_ref, k_ref = reference.apply_rotary(positions, q, key, table)
    assert torch.equal(q_out, q_ref)
    stored = k8.view(-1, 2, 8)[slots]
    assert torch.equal(
        stored.view(torch.uint8), reference.quantize_kv(k_ref, scales["k_scale"]).view(torch.uint8)
    )


def test_an_fp8_block_is_half_a_16_bit_one_so_twice_the_blocks_fit() -> None:
    per_block = {
        dtype: kv_bytes_per_block(CONFIG, 16, dtype) for dtype in (FP8, torch.bfloat16, torch.float32)
    }
    assert (
        per_block[FP8]
        == 2 * 3 * 16 * 2 * 8
        == per_block[torch.bfloat16] // 2
        == per_block[torch.float32] // 4
    )
    budget = 1000 * per_block[torch.bfloat16] + 7
    assert num_blocks_for_budget(budget, CONFIG, 16, FP8) == 2000
    assert num_blocks_for_budget(budget, CONFIG, 16, torch.bfloat16) == 1000
    caches = allocate_kv_cache(CONFIG, 5, 16, FP8, "cpu")
    assert len(caches) == 3 and all(k.dtype == FP8 and k.shape == (5, 16, 2, 8) for k, _ in caches)
    assert all((k.float() == 0).all() and (v.float() == 0).all() for k, v in caches)


def test_the_memory_budget_counts_the_models_kv_cache_dtype() -> None:
    """The engine's KV pool is sized in blocks of the model's KV-cache dtype: the same budget holds exactly
    twice the blocks of a bf16 model's when the cache is fp8 (the scales stay float32)."""
    plain = LlamaForCausalLM(CONFIG).to(torch.bfloat16)
    fp8 = LlamaForCausalLM(CONFIG, kv_cache=KVCacheConfig()).to(torch.bfloat16)
    assert plain.kv_cache_dtype == torch.bfloat16 and fp8.kv_cache_dtype == FP8
    config = EngineConfig(kv_cache_memory_bytes=300 * kv_bytes_per_block(CONFIG, 16, torch.bfloat16))
    blocks = [num_kv_blocks_from_memory(m, config, 16, 64, 4, cap=10**6) for m in (plain, fp8)]
    assert blocks == [300, 600]
    assert sorted(n for n, _ in fp8.named_parameters() if "scale" in n)[:2] == [
        "model.layers.0.self_attn.k_scale",
        "model.layers.0.self_attn.v_scale",
    ]
