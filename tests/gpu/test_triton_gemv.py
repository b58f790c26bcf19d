"""Triton batch-1 GEMV (plain, and gated: SiLU-and-mul folded in) against torch's linear in float64,
and the kernel dispatch's choice of it, on random shapes (ragged ones take the masked path, even ones
the unmasked one) in fp16 and bf16."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, INTERPRET, rel_error

from kiln.engine import kernels
from kiln.engine.kernels import reference

pytestmark = pytest.mark.gpu

# (N, K, config or None for the default)
SHAPES = [(64, 128, (4, 64, 4, 1)), (70, 100, (8, 32, 4, 1)), (33, 96, (1, 64, 2, 1)), (50, 300, None)]
if not INTERPRET:
    SHAPES += [(4096, 4096, None), (1000, 4000, None), (12288, 4096, (4, 4096, 8, 3)), (4096, 11008, None)]
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "config"), SHAPES)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gemv_matches_reference(device, dtype, n, k, config, gated):
    from kiln.engine.kernels.triton_gemv import gemv

    gen = torch.Generator(device=device).manual_seed(n * k)
    rows = 2 * n if gated else n
    weight = (torch.randn(rows, k, device=device, generator=gen) / k**0.5).to(dtype)
    x = torch.randn(1, k, device=device, generator=gen).to(dtype)
    out = gemv(x, weight, config=config, gated=gated)
    assert out.shape == (1, n) and out.dtype == dtype
    expected = torch.nn.functional.linear(x.double(), weight.double())
    if gated:
        expected = reference.silu_and_mul(expected)
    assert rel_error(out, expected) < BOUND[dtype]
    if gated:  # no further from the exact result than the unfused kernels in the model dtype
        unfused = reference.silu_and_mul(torch.nn.functional.linear(x, weight))
        assert rel_error(out, expected) <= 2 * rel_error(unfused, expected) + 1e-4


def test_gemv_refuses_what_it_does_not_compute(device):
    from kiln.engine.kernels.triton_gemv import gemv

    weight = torch.zeros(8, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="one token"):
        gemv(torch.zeros(2, 16, device=device, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="features"):
        gemv(torch.zeros(1, 8, device=device, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="even number"):
        gemv(torch.zeros(1, 16, device=device, dtype=torch.float16), weight[:7], gated=True)


@pytest.mark.skipif(INTERPRET, reason="the dispatch picks Triton on CUDA tensors only")
def test_linear_dispatch_takes_the_gemv_for_one_token_only(device, monkeypatch):
    from kiln.engine.kernels import triton_gemv

    calls = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    weight = torch.randn(64, 32, device=device, dtype=torch.float16)
    bias = torch.randn(64, device=device, dtype=torch.float16)
    for rows in (1, 2, 7):
        x = torch.randn(rows, 32, device=device, dtype=torch.float16)
        got = kernels.linear(x, weight)
        assert rel_error(got, torch.nn.functional.linear(x.double(), weight.double())) < 2e-3
    kernels.linear(torch.randn(1, 32, device=device, dtype=torch.float16), weight, bias)  # bias: cuBLAS
    assert calls == [torch.Size([1, 32])]
    for rows in (1, 3):
        x = torch.randn(rows, 32, device=device, dtype=torch.float16)
        got = kernels.gated_linear(x, weight)
        want = reference.silu_and_mul(torch.nn.functional.linear(x.double(), weight.double()))
        assert got.shape == (rows, 32) and rel_error(got, want) < 2e-3
    assert calls == [torch.Size([1, 32])] * 2
