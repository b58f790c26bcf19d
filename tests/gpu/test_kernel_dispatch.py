"""`kiln.kernels` picks the Triton kernel for CUDA tensors and the reference elsewhere.

The CPU half runs everywhere (CI included) and checks the dispatch returns exactly the reference's
results; the GPU half checks CUDA tensors reach the Triton modules (by patching them).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_paged_batch

from kiln import kernels
from kiln.kernels import quant_reference, reference


def test_cpu_tensors_take_the_reference_path():
    batch = make_paged_batch([4, 1], [3, 9], 8, 2, 16, 4, torch.float32, torch.device("cpu"))
    out = kernels.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, 0.25)
    ref = reference.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, 0.25)
    assert torch.equal(out, ref)
    x = torch.randn(3, 32)
    assert torch.equal(kernels.silu_and_mul(x), reference.silu_and_mul(x))
    residual = torch.randn(3, 32)
    out, new_residual = kernels.rms_norm(x, torch.ones(32), 1e-6, residual)
    ref, ref_residual = reference.rms_norm(x, torch.ones(32), 1e-6, residual)
    assert torch.equal(out, ref) and torch.equal(new_residual, ref_residual)


def test_cpu_quantized_linears_are_the_references():
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(24, 64, generator=gen), torch.randn(3, 64, generator=gen)
    bias, smooth = torch.randn(24, generator=gen), torch.rand(64, generator=gen) + 0.5
    q, scale = quant_reference.quantize_int8(w, 16)
    assert torch.equal(
        kernels.int8_wo_linear(x, q, scale, bias), quant_reference.int8_wo_linear(x, q, scale, bias)
    )
    q, scale = quant_reference.quantize_int8(w)
    assert torch.equal(
        kernels.int8_sq_linear(x, q, scale, smooth, bias),
        quant_reference.int8_sq_linear(x, q, scale, smooth, bias),
    )
    q, scale = quant_reference.quantize_fp8(w)
    assert torch.equal(kernels.fp8_linear(x, q, scale, bias), quant_reference.fp8_linear(x, q, scale, bias))


def test_rotary_store_kv_fallback_is_rotary_then_store():
    batch = make_paged_batch([3, 1], [0, 5], 4, 2, 8, 4, torch.float32, torch.device("cpu"))
    positions = torch.tensor([0, 1, 2, 5])
    table = torch.randn(16, 8)
    k_out, v_out = torch.zeros_like(batch.k_cache), torch.zeros_like(batch.v_cache)
    q = kernels.rotary_store_kv(
        positions, batch.query, batch.key, batch.value, table, k_out, v_out, batch.meta.slot_mapping
    )
    q_ref, k_ref = reference.apply_rotary(positions, batch.query, batch.key, table)
    k_cache, v_cache = torch.zeros_like(batch.k_cache), torch.zeros_like(batch.v_cache)
    reference.store_kv(k_ref, batch.value, k_cache, v_cache, batch.meta.slot_mapping)
    assert torch.equal(q, q_ref) and torch.equal(k_out, k_cache) and torch.equal(v_out, v_cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_take_the_triton_path(monkeypatch):
    from kiln.kernels import triton_activation, triton_attention, triton_cache, triton_norm

    called: list[str] = []
    for module, name in [
        (triton_attention, "paged_attention"),
        (triton_cache, "store_kv"),
        (triton_cache, "apply_rotary"),
        (triton_cache, "rotary_store_kv"),
        (triton_norm, "rms_norm"),
        (triton_activation, "silu_and_mul"),
    ]:
        monkeypatch.setattr(module, name, lambda *args, _name=name, **kw: called.append(_name))
    x = torch.zeros(2, 8, device="cuda")
    heads = torch.zeros(2, 1, 8, device="cuda")
    kernels.paged_attention(heads, heads, heads, None, 1.0)
    kernels.store_kv(heads, heads, heads, heads, x)
    kernels.apply_rotary(x, heads, heads, x)
    kernels.rotary_store_kv(x, heads, heads, heads, x, heads, heads, x)
    kernels.rms_norm(x, x[0], 1e-6)
    kernels.silu_and_mul(x)
    assert called == [
        "paged_attention",
        "store_kv",
        "apply_rotary",
        "rotary_store_kv",
        "rms_norm",
        "silu_and_mul",
    ]


def test_pdl_is_off_on_the_cpu_and_when_disabled(monkeypatch):
    from kiln.kernels import pdl

    assert not pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "_DISABLED", True)
    assert not pdl.pdl_enabled(torch.device("cuda", 0))  # decided before asking the driver
