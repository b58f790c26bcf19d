"""Activation quantization fused into the kernel that makes the activation (RMSNorm, SiLU-and-mul), and the
8-bit matmuls that take it, against the unfused kernels and kiln.kernels.quant_reference.

The fused kernels must give the bytes of the unfused path they replace (the Triton RMSNorm or SiLU-and-mul,
then the Triton per-token quantization): scales and int8 values bit for bit, e4m3 values bit for bit on a
GPU (Triton's interpreter casts float32 -> e4m3 its own way, so there only the scales are compared, as in
test_triton_quant.py). RMSNorm's fused kernel is held to that but for a rare element one step away:
there the normalised row it quantizes is one 16-bit unit off the plain kernel's (on an H100, 2026-12-05:
at most 2 of 256 x 4096 elements, every scale equal), as a different order of the row's float32 sum of
squares gives; the two kernels are compiled separately, and Triton lays each out from its own loads and
stores. The SiLU-and-mul kernel is the quantization kernel itself, with no reduction before its product,
and stays bit for bit. Against the PyTorch reference they differ where the 16-bit activation does (the
Triton RMSNorm is within 2e-3 / 1e-2 of torch's, tests/gpu/test_triton_small_kernels.py): the dequantized
values are held to QUANT_BOUND. The matmuls over the quantized activation are held to the bounds of the
unfused paths in test_triton_quant.py, whose kernels they are.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, INTERPRET, force_one_pass, quant_steps, rel_error

from kiln import kernels
from kiln.kernels import quant_reference as qr

pytestmark = pytest.mark.gpu
QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn]
HIDDEN = [96, 100, 128] if INTERPRET else [100, 2048, 4096, 5120]
TOKENS = [1, 3] if INTERPRET else [1, 7, 33, 256]
# Dequantized fused output against the reference's: a 16-bit activation one unit apart moves an element by
# at most one quantization step (1/127 of the row's max for int8, 1/8 relative for e4m3), rarely.
QUANT_BOUND = {torch.int8: 2e-2, torch.float8_e4m3fn: 3e-2}


def _same(got: qr.QuantizedActivation, want: qr.QuantizedActivation) -> None:
    """The same bytes (see the module docstring for the e4m3 values under the interpreter)."""
    assert got.dtype == want.dtype and got.q.dtype == want.q.dtype and got.q.shape == want.q.shape
    assert torch.equal(got.scale.cpu(), want.scale.cpu())
    if got.q.dtype == torch.int8 or not INTERPRET:
        assert torch.equal(got.q.cpu().view(torch.uint8), want.q.cpu().view(torch.uint8))


def _same_but_for_the_reduction(got: qr.QuantizedActivation, want: qr.QuantizedActivation) -> None:
    """`_same`, but for elements moved by the order of the row's reduction (see the module docstring):
    scales within one 16-bit unit; in rows of the same scale, 8-bit values at most one step apart, and
    few of them (two, or one in a thousand)."""
    assert got.dtype == want.dtype and got.q.dtype == want.q.dtype and got.q.shape == want.q.shape
    got_scale, want_scale = got.scale.cpu(), want.scale.cpu()
    assert torch.allclose(got_scale, want_scale, rtol=2**-7, atol=0)
    if got.q.dtype != torch.int8 and INTERPRET:
        return
    rows = got_scale == want_scale
    apart = quant_steps(got.q.cpu()[rows], want.q.cpu()[rows])
    if apart.numel():
        assert apart.max() <= 1 and (apart > 0).sum() <= 2 + apart.numel() // 1000


def _near(got: qr.QuantizedActivation, want: qr.QuantizedActivation) -> None:
    """Dequantized, within QUANT_BOUND of the reference's (e4m3 on a GPU only: the interpreter's cast)."""
    if got.q.dtype != torch.int8 and INTERPRET:
        return
    value = got.q.cpu().float() * got.scale.cpu()[:, None]
    assert rel_error(value, want.q.float() * want.scale[:, None]) < QUANT_BOUND[got.q.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", QUANT_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_is_the_unfused_path(device, dtype, quant, with_residual):
    from kiln.kernels.triton_norm import rms_norm, rms_norm_quant
    from kiln.kernels.triton_quant_act import quantize_rows

    gen = torch.Generator().manual_seed(3)
    for hidden in HIDDEN:
        for m in TOKENS:
            x = (torch.randn(m, hidden, generator=gen) * 3).to(dtype)
            residual = torch.randn(m, hidden, generator=gen).to(dtype) if with_residual else None
            weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
            if m > 2:
                x[2] = 0  # an all-zero row (without a residual) gets scale 1
            want, want_residual = qr.rms_norm_quant(x, weight, 1e-5, residual, quant)
            on = (x.to(device), weight.to(device), None if residual is None else residual.to(device))
            got, got_residual = rms_norm_quant(*on[:2], 1e-5, on[2], quant)
            normed, _ = rms_norm(*on[:2], 1e-5, on[2])
            _same_but_for_the_reduction(
                got, qr.QuantizedActivation(*quantize_rows(normed, quant), normed.dtype)
            )
            _near(got, want)
            if with_residual:
                assert torch.equal(got_residual.cpu(), want_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", QUANT_DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("one_pass", [None, True, False])  # None: the measured choice; else forced
def test_silu_and_mul_quant_is_the_unfused_path_bit_for_bit(
    device, dtype, quant, smooth, one_pass, monkeypatch
):
    from kiln.kernels.triton_activation import silu_and_mul
    from kiln.kernels.triton_quant_act import quantize_rows, silu_and_mul_quant

    force_one_pass(monkeypatch, one_pass)
    gen = torch.Generator().manual_seed(4)
    for inter in [*HIDDEN, 11008, 14336] if not INTERPRET else HIDDEN:
        for m in TOKENS:
            x = (torch.randn(m, 2 * inter, generator=gen) * 2).to(dtype)
            s = torch.rand(inter, generator=gen) + 0.5 if smooth else None
            want = qr.silu_and_mul_quant(x, quant, s)
            on = (x.to(device), None if s is None else s.to(device))
            got = silu_and_mul_quant(on[0], quant, on[1])
            product = silu_and_mul(on[0])
            _same(got, qr.QuantizedActivation(*quantize_rows(product, quant, on[1]), product.dtype))
            _near(got, want)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 33, 256])
def test_matmuls_over_a_quantized_activation_match_the_references(dtype, m):
    from kiln.kernels.triton_quant_linear import FAST_ACCUM, SCALED_MM_MIN_TOKENS

    gen = torch.Generator().manual_seed(m)
    for n, k in [(64, 128), (70, 100), (4096, 4096), (1000, 4000)]:
        w = (torch.randn(n, k, generator=gen) / k**0.5).cuda()
        x = torch.randn(m, k, generator=gen).to(dtype).cuda()
        bias = torch.randn(n, generator=gen).to(dtype).cuda()
        q, scale = qr.quantize_int8(w)
        a = qr.quantize_activation(x, torch.int8)
        assert (
            rel_error(kernels.int8_sq_matmul(a, q, scale, bias), qr.int8_sq_matmul(a, q, scale, bias)) < 1e-4
        )
        q8, scale8 = qr.quantize_fp8(w)
        a8 = qr.quantize_activation(x, torch.float8_e4m3fn)
        exact = (a8.q.double() @ q8.double().t()) * a8.scale.double()[:, None] * scale8.double()[None, :]
        got = kernels.fp8_matmul(a8, q8, scale8, bias)
        # cuBLASLt's reduced-precision sums (tests/gpu/test_triton_quant.py's FAST_ACCUM_BOUND)
        fast = FAST_ACCUM and m >= SCALED_MM_MIN_TOKENS
        assert got.dtype == dtype and rel_error(got, exact + bias.double()) < (
            (5e-3 if fast else 2e-3) if dtype == torch.float16 else 1.6e-2
        )
