"""The quantized linear references (kiln.kernels.quant_reference): round trips, scale layouts, zero rows,
per-token FP8 activation scaling, and the matmuls they define."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import quant_reference as qr


def _weight(rows: int = 48, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_int8_per_channel_round_trip_is_within_half_a_step() -> None:
    w = _weight()
    q, scale = qr.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (48,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    assert q.abs().max().item() == 127  # each row's largest weight lands on the end of the range
    error = (qr.dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step


def test_int8_per_group_has_one_scale_per_group_and_a_smaller_error() -> None:
    w = _weight(cols=128)
    w[:, :32] *= 20  # one loud group per row: per-channel scales waste their range on it
    q, scale = qr.quantize_int8(w, group_size=32)
    assert scale.shape == (48, 4)
    torch.testing.assert_close(scale, w.reshape(48, 4, 32).abs().amax(dim=-1) / 127)
    grouped_error = (qr.dequantize_int8(q, scale) - w).abs()
    assert (grouped_error <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all()
    q1, scale1 = qr.quantize_int8(w)
    channel_error = (qr.dequantize_int8(q1, scale1) - w)[:, 32:].abs().mean()
    assert grouped_error[:, 32:].mean() < channel_error / 10


def test_group_size_must_divide_the_inputs() -> None:
    with pytest.raises(ValueError, match="does not divide the weight's 64 inputs"):
        qr.quantize_int8(_weight(), group_size=48)
    with pytest.raises(ValueError, match="2-D weight"):
        qr.quantize_int8(torch.ones(4))


def test_zero_rows_get_scale_one_and_dequantize_to_zero() -> None:
    w = _weight()
    w[3] = 0
    w[5, :16] = 0
    q, scale = qr.quantize_int8(w, group_size=16)
    assert scale[3].eq(1).all() and scale[5, 0] == 1 and (q[3] == 0).all()
    assert (qr.dequantize_int8(q, scale)[3] == 0).all()
    fq, fscale = qr.quantize_fp8(w)
    assert fscale[3] == 1 and (qr.dequantize_fp8(fq, fscale)[3] == 0).all()
    assert torch.isfinite(qr.dequantize_fp8(fq, fscale)).all()


def test_fp8_per_channel_round_trip_is_within_e4m3_precision() -> None:
    w = _weight()
    q, scale = qr.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 448)
    assert q.float().abs().amax(dim=1).eq(448).all()
    back = qr.dequantize_fp8(q, scale)
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself; the subnormals
    # below 2^-6 (in scaled units) by at most half their fixed step of 2^-9.
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
    assert ((back - w).abs() <= bound + 1e-7).all()


def test_fp8_activations_get_one_scale_per_token() -> None:
    x = _weight(rows=5, cols=32, seed=1)
    x[1] *= 1000  # a loud token does not coarsen its neighbours
    x[2] = 0
    q, scale = qr.quantize_fp8_rows(x)
    assert q.shape == x.shape and scale.shape == (5,)
    torch.testing.assert_close(scale[[0, 1, 3, 4]], x[[0, 1, 3, 4]].abs().amax(dim=1) / 448)
    assert scale[2] == 1
    relative = ((q.float() * scale[:, None]) - x).abs().amax(dim=1) / x.abs().amax(dim=1).clamp(min=1e-9)
    assert (relative[[0, 1, 3, 4]] <= 2**-4).all()


def test_int8_wo_linear_is_the_matmul_with_the_dequantized_weight() -> None:
    w, x, bias = _weight(), _weight(rows=7, cols=64, seed=2), torch.randn(48)
    q, scale = qr.quantize_int8(w, group_size=16)
    out = qr.int8_wo_linear(x, q, scale, bias)
    assert out.shape == (7, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ qr.dequantize_int8(q, scale).t() + bias)
    # The weight is dequantized to the activation dtype: bf16 in, bf16 out.
    half = qr.int8_wo_linear(x.bfloat16(), q, scale)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), x @ qr.dequantize_int8(q, scale).t(), atol=0.15, rtol=0.02)


def test_fp8_linear_emulates_the_fp8_gemm() -> None:
    w, x, bias = _weight(), _weight(rows=7, cols=64, seed=3), torch.randn(48)
    q, scale = qr.quantize_fp8(w)
    out = qr.fp8_linear(x, q, scale, bias)
    xq, x_scale = qr.quantize_fp8_rows(x)
    dequantized = (xq.float() * x_scale[:, None]) @ qr.dequantize_fp8(q, scale).t()
    torch.testing.assert_close(out, dequantized + bias)
    assert out.shape == (7, 48) and qr.fp8_linear(x.half(), q, scale).dtype == torch.float16
    # Close to the exact product, within what two e4m3 roundings allow.
    exact = x @ w.t() + bias
    assert (out - exact).norm() / exact.norm() < 0.06


def test_fp8_linear_rows_are_independent_of_the_batch() -> None:
    """Dynamic per-token scales: a token's output does not depend on the other tokens in the step."""
    w, x = _weight(), _weight(rows=6, cols=64, seed=4)
    x[0] *= 1e4  # with one scale for the whole batch, this token would flush the others' small values
    q, scale = qr.quantize_fp8(w)
    alone = torch.cat([qr.fp8_linear(x[i : i + 1], q, scale) for i in range(6)])
    torch.testing.assert_close(qr.fp8_linear(x, q, scale), alone, atol=1e-5, rtol=1e-6)


def test_smoothing_factors_follow_the_formula_and_guard_zeros() -> None:
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    wgt = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = qr.smoothing_factors(act, wgt, alpha=0.5)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # sqrt(a) / sqrt(w); 1 for zeros
    torch.testing.assert_close(qr.smoothing_factors(act[:2], wgt[:2], alpha=1.0), act[:2])
    torch.testing.assert_close(qr.smoothing_factors(act[:2], wgt[:2], alpha=0.0), 1 / wgt[:2])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        qr.smoothing_factors(act, wgt, alpha=1.2)


def test_int8_rows_are_quantized_per_token() -> None:
    x = _weight(rows=5, cols=32)
    x[2] = 0
    q, scale = qr.quantize_int8_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (5,) and scale[2] == 1 and (q[2] == 0).all()
    torch.testing.assert_close(scale[[0, 1, 3, 4]], x[[0, 1, 3, 4]].abs().amax(-1) / 127)
    assert (q.float() * scale[:, None] - x).abs().le(scale[:, None] / 2 + 1e-6).all()


def test_int8_matmul_sums_exactly_in_int32() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (3, 4096), generator=g, dtype=torch.int8)
    b = torch.full((2, 4096), 127, dtype=torch.int8)
    a[0] = 127  # 127 * 127 * 4096 = 66,064,384: beyond float32's exact integers (2^24)
    out = qr.int8_matmul(a, b)
    assert out.dtype == torch.int32
    exact = [[sum(int(v) * 127 for v in row.tolist())] * 2 for row in a]
    assert out.tolist() == exact


def test_int8_sq_linear_is_the_dequantized_w8a8_product() -> None:
    """int8_sq_linear == (quantized smoothed x) @ (dequantized smoothed w).T exactly up to float32
    rounding, and tracks the float product within the quantization error."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g)
    x[:, 5] *= 40  # an outlier channel, as in a transformer's activations
    w = _weight(rows=24, cols=64)
    bias = torch.randn(24, generator=g)
    s = qr.smoothing_factors(x.abs().amax(0), w.abs().amax(0), alpha=0.5)
    q, scale = qr.quantize_int8(w * s)
    out = qr.int8_sq_linear(x, q, scale, s, bias)
    xq, xs = qr.quantize_int8_rows(x / s)
    expected = (xq.double() @ q.double().t()) * xs.double()[:, None] * scale.double()[None, :] + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    exact = x @ w.t() + bias
    smoothed_error = (out - exact).abs().mean()
    q0, scale0 = qr.quantize_int8(w)
    unsmoothed_error = (qr.int8_sq_linear(x, q0, scale0, None, bias) - exact).abs().mean()
    assert smoothed_error < unsmoothed_error / 2  # smoothing moved the outlier into the weight's scale
    assert smoothed_error < 0.02 * exact.abs().mean()
    half = qr.int8_sq_linear(x.to(torch.bfloat16), q, scale, s, bias.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
