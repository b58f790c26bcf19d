"""Triton batch-1 GEMV (plain, RMSNorm prologue, SiLU-and-mul prologue, residual epilogue) against the
PyTorch reference in float32 and against the unfused half-precision reference, on random shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, INTERPRET, rel_error

from kiln.engine.kernels import reference

pytestmark = pytest.mark.gpu

# (N, K, config or None for the default): ragged shapes hit the masked path, even ones the unmasked one.
SHAPES = [(64, 128, (4, 64, 4, 1)), (70, 100, (8, 32, 4, 1)), (33, 96, (1, 64, 2, 1))]
if not INTERPRET:
    SHAPES += [(4096, 4096, None), (1000, 4000, None), (12288, 4096, (8, 512, 8, 3)), (4096, 11008, None)]
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "config"), SHAPES)
@pytest.mark.parametrize("variant", ["plain", "norm", "silu_mul+residual", "residual"])
def test_gemv_matches_reference(device, dtype, n, k, config, variant):
    from kiln.engine.kernels.triton_gemv import gemv

    gen = torch.Generator(device=device).manual_seed(n * k)
    weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
    x = torch.randn(1, 2 * k if variant.startswith("silu") else k, device=device, generator=gen).to(dtype)
    kwargs: dict = {}
    if variant == "norm":
        kwargs = {"norm_weight": (torch.rand(k, device=device, generator=gen) + 0.5).to(dtype), "eps": 1e-5}
    if variant.startswith("silu"):
        kwargs["silu_mul"] = True
    if variant.endswith("residual"):
        kwargs["residual"] = torch.randn(1, n, device=device, generator=gen).to(dtype)
    out = gemv(x, weight, config=config, **kwargs)
    assert out.shape == (1, n) and out.dtype == dtype
    exact = {key: v.double() if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
    expected = reference.gemv(x.double(), weight.double(), **exact)
    assert rel_error(out, expected) < BOUND[dtype]
    # No worse than the unfused kernels in the model dtype, which round between steps.
    unfused = reference.gemv(x, weight, **kwargs)
    assert rel_error(out, expected) <= rel_error(unfused, expected) * 2 + 1e-4


def test_gemv_refuses_more_than_one_token(device):
    from kiln.engine.kernels.triton_gemv import gemv

    weight = torch.zeros(8, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="one token"):
        gemv(torch.zeros(2, 16, device=device, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="features"):
        gemv(torch.zeros(1, 8, device=device, dtype=torch.float16), weight)
