"""Triton store_kv, rotary (alone and fused with the store), RMSNorm (with and without the residual)
and SiLU-and-multiply against the PyTorch references, on random shapes in fp16 and bf16."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, rel_error, rope_table, rotary_case, store_case

from kiln.kernels import reference

pytestmark = pytest.mark.gpu

ROTARY_BOUNDS = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # about one unit in the last place


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "num_kv_heads", "block_size"), [(64, 1, 16), (128, 8, 32), (128, 2, 1)])
def test_store_kv_matches_reference_and_skips_padding(device, dtype, head_dim, num_kv_heads, block_size):
    from kiln.kernels.triton_cache import store_kv

    batch = store_case(head_dim, num_kv_heads, block_size, dtype, device)
    # Fresh poisoned caches: every written slot must come out right, every other slot untouched.
    k_ref = torch.full_like(batch.k_cache, float("nan"))
    v_ref = torch.full_like(batch.v_cache, float("nan"))
    k_out, v_out = k_ref.clone(), v_ref.clone()
    # Strided inputs, as slices of a fused QKV projection output would be.
    fused = torch.cat([batch.key, batch.value], dim=1)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads:]
    store_kv(key, value, k_out, v_out, batch.meta.slot_mapping)
    reference.store_kv(key, value, k_ref, v_ref, batch.meta.slot_mapping)
    assert torch.equal(k_out.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_out.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    assert (~k_out.isnan()).sum() == 28 * num_kv_heads * head_dim  # 28 real tokens, padding skipped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "num_heads", "num_kv_heads"), [(64, 9, 3), (128, 32, 8), (128, 32, 32)])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_apply_rotary_matches_reference(device, dtype, head_dim, num_heads, num_kv_heads, scaling):
    from kiln.kernels.triton_cache import apply_rotary

    gen = torch.Generator().manual_seed(11)
    num_tokens = 37
    table = rope_table(head_dim, 8192, device, scaling)
    positions = torch.randint(0, 8192, (num_tokens,), generator=gen).to(device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    query, key = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    q_out, k_out = apply_rotary(positions, query, key, table)
    q_ref, k_ref = reference.apply_rotary(positions, query, key, table)
    # Each product and sum is rounded as torch rounds it, so they differ by a unit in the last place at most.
    bound = ROTARY_BOUNDS[dtype]
    assert rel_error(q_out, q_ref) < bound and rel_error(k_out, k_ref) < bound
    assert torch.equal(query, qkv[:, :num_heads])  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads", "block_size"), [(64, 8, 8, 16), (128, 32, 8, 32)]
)
def test_rotary_store_kv_equals_rotary_then_store(
    device, dtype, head_dim, num_heads, num_kv_heads, block_size
):
    from kiln.kernels.triton_cache import rotary_store_kv

    batch, positions, table = rotary_case(head_dim, num_heads, num_kv_heads, block_size, dtype, device)
    k_out, v_out = batch.k_cache.clone(), batch.v_cache.clone()
    k_ref, v_ref = batch.k_cache.clone(), batch.v_cache.clone()
    q_out = rotary_store_kv(
        positions, batch.query, batch.key, batch.value, table, k_out, v_out, batch.meta.slot_mapping
    )
    q_ref, key_ref = reference.apply_rotary(positions, batch.query, batch.key, table)
    reference.store_kv(key_ref, batch.value, k_ref, v_ref, batch.meta.slot_mapping)
    assert rel_error(q_out, q_ref) < ROTARY_BOUNDS[dtype]
    assert rel_error(k_out, k_ref) < ROTARY_BOUNDS[dtype]
    assert torch.equal(v_out, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 5120])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(device, dtype, hidden, with_residual):
    from kiln.kernels.triton_norm import rms_norm

    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(19, hidden, generator=gen)).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    residual = torch.randn(19, hidden, generator=gen).to(dtype).to(device) if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_error(out, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
    if with_residual:
        assert torch.equal(new_residual, ref_residual)
    else:
        assert new_residual is None


def test_rms_norm_keeps_leading_dims(device):
    from kiln.kernels.triton_norm import rms_norm

    x = torch.randn(2, 3, 256).half().to(device)
    weight = torch.rand(256).half().to(device)
    out, _ = rms_norm(x, weight, 1e-6)
    assert out.shape == (2, 3, 256)
    assert rel_error(out, reference.rms_norm(x, weight, 1e-6)[0]) < 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (33, 11008), (7, 14336), (5, 100)])
def test_silu_and_mul_matches_reference(device, dtype, rows, inter):
    from kiln.kernels.triton_activation import silu_and_mul

    gen = torch.Generator().manual_seed(inter)
    x = (4 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype).to(device)
    out = silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    assert out.shape == (rows, inter) and out.dtype == dtype
    assert rel_error(out, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
