"""The PyTorch reference kernels against naive dense computations (these define what Triton must match)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import reference as ref
from kiln.kernels.attention_metadata import AttentionMetadata


def _dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, Hq, D] are the LAST q_len positions of a context k/v [seq_len, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seq_len, q_len = k.shape[0], q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    allowed = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double()).to(q.dtype)


def _paged_batch(
    seq_lens: list[int], q_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, seed: int
):
    """Random contexts written into a shuffled paged cache: (meta, per-request K/V, caches, slots)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks stay zero and must never be read
    order = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables, contexts, slots = [], [], []
    for seq_len, q_len, n_blocks in zip(seq_lens, q_lens, blocks_needed, strict=True):
        table = [order.pop() for _ in range(n_blocks)]
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        seq_slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        )
        # The cached prefix is written directly; the new tokens go through store_kv below.
        prefix = seq_len - q_len
        ref.store_kv(keys[:prefix], values[:prefix], k_cache, v_cache, seq_slots[:prefix])
        tables.append(table)
        contexts.append((keys, values))
        slots.append(seq_slots[prefix:])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = AttentionMetadata.for_batch(q_lens, seq_lens, block_tables, block_size, torch.cat(slots))
    return meta, contexts, k_cache, v_cache


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense_causal(num_q_heads: int, num_kv_heads: int, block_size: int) -> None:
    head_dim, scale = 8, 0.3
    # Full prefill, prefill chunk after a cached prefix, decode, and a chunk ending mid-block.
    seq_lens, q_lens = [9, 21, 17, 5], [9, 6, 1, 2]
    meta, contexts, k_cache, v_cache = _paged_batch(seq_lens, q_lens, block_size, num_kv_heads, head_dim, 0)
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(sum(q_lens) + 2, num_q_heads, head_dim, generator=gen)  # 2 padding rows
    new_keys = torch.cat([k[n - q :] for (k, _), n, q in zip(contexts, seq_lens, q_lens, strict=True)])
    new_values = torch.cat([v[n - q :] for (_, v), n, q in zip(contexts, seq_lens, q_lens, strict=True)])
    pad = torch.full((2,), -1, dtype=torch.int64)
    padded_keys = torch.cat([new_keys, torch.full((2, num_kv_heads, head_dim), 99.0)])
    padded_values = torch.cat([new_values, torch.full((2, num_kv_heads, head_dim), 99.0)])
    before = k_cache.clone()
    ref.store_kv(padded_keys, padded_values, k_cache, v_cache, torch.cat([meta.slot_mapping, pad]))
    assert not (k_cache == 99.0).any(), "a slot of -1 must not be written"
    assert (k_cache != before).any()

    out = ref.paged_attention(query, k_cache, v_cache, meta, scale)
    assert out.shape == query.shape
    for i, (keys, values) in enumerate(contexts):
        rows = slice(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
        expected = _dense_causal_attention(query[rows], keys, values, scale)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:])), "padding rows are zeros"


@pytest.mark.parametrize(
    ("q_lens", "expected"),
    [([1, 1, 1, 5, 1], 3), ([5, 1], 0), ([1], 1), ([1, 1], 2), ([3], 0), ([1, 2, 1, 1], 1)],
)
def test_leading_decodes_are_counted_up_to_the_first_prompt(q_lens: list[int], expected: int) -> None:
    tables = torch.zeros(len(q_lens), 1, dtype=torch.int32)
    meta = AttentionMetadata.for_batch(q_lens, [8] * len(q_lens), tables, 16)
    assert meta.num_leading_decodes == expected


def test_store_kv_writes_each_slot_at_block_and_offset() -> None:
    k_cache = torch.zeros(3, 4, 1, 2)
    v_cache = torch.zeros(3, 4, 1, 2)
    key = torch.arange(6, dtype=torch.float32).view(3, 1, 2)
    value = -key
    ref.store_kv(key, value, k_cache, v_cache, torch.tensor([9, -1, 2]))
    assert torch.equal(k_cache[2, 1, 0], key[0, 0])  # slot 9 = block 2, offset 1
    assert torch.equal(v_cache[0, 2, 0], value[2, 0])  # slot 2 = block 0, offset 2
    assert int((k_cache != 0).any(-1).sum()) == 2, "only the two real slots are written"


def test_store_kv_casts_to_cache_dtype_and_works_on_strided_views() -> None:
    whole = torch.zeros(2, 2, 4, 1, 2, dtype=torch.bfloat16)  # [k|v, blocks, block_size, H, D]
    k_cache, v_cache = whole[0], whole[1]
    key = torch.full((1, 1, 2), 1.5)
    ref.store_kv(key, key * 2, k_cache, v_cache, torch.tensor([5]))
    assert whole[0, 1, 1, 0].tolist() == [1.5, 1.5]
    assert whole[1, 1, 1, 0].tolist() == [3.0, 3.0]


def test_rms_norm_without_and_with_fused_residual() -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    weight = torch.randn(16, generator=gen)
    eps = 1e-5

    def naive(t: torch.Tensor) -> torch.Tensor:
        return weight * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    out, new_residual = ref.rms_norm(x, weight, eps)
    assert new_residual is None
    torch.testing.assert_close(out, naive(x))
    out, new_residual = ref.rms_norm(x, weight, eps, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(out, naive(x + residual))


def test_rms_norm_half_precision_matches_hf_rounding() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 32, generator=gen) * 30).bfloat16()
    hf = LlamaRMSNorm(32, eps=1e-6).bfloat16()
    with torch.no_grad():
        hf.weight.copy_(torch.randn(32, generator=gen))
        out, _ = ref.rms_norm(x, hf.weight, 1e-6)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, hf(x))


def test_silu_and_mul() -> None:
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ref.silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])


def test_apply_rotary_matches_hf_rotate_half() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    head_dim, max_pos = 8, 32
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.tensor([0, 5, 31, 7])
    q, k = torch.randn(4, 4, head_dim, generator=gen), torch.randn(4, 2, head_dim, generator=gen)
    got_q, got_k = ref.apply_rotary(positions, q, k, cache)
    emb = torch.cat([angles, angles], dim=-1)[positions]  # HF's [T, D] cos/sin, broadcast over heads
    want_q, want_k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    assert torch.equal(got_q[0], q[0]), "position 0 is the identity rotation"
