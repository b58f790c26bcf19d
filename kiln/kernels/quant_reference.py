"""PyTorch references of the quantized linear layers: quantize, dequantize, and the matmuls they define.

These are the semantics the GPU kernels must match (kiln.kernels.triton_quant_linear and the kernels it
picks; tests/gpu/test_triton_quant.py compares them), and the CPU path. Shapes: a weight is [N, K] (N
output channels, K inputs), an activation [T, K].

Rules:
- Symmetric quantization, no zero point: w ~= q * scale, with scale = amax / QMAX over the block the
  scale covers (a whole row: per channel; or `group_size` consecutive inputs of a row: per group).
  QMAX is 127 for int8 (q rounded to nearest, in [-127, 127], so the range is symmetric) and 448 for
  float8_e4m3fn (its largest finite value; q = w / scale cast to e4m3, round to nearest even).
- A block of zeros gets scale 1 (q = 0, dequantized exactly to 0), never a division by zero.
- Scales are float32 whatever the model dtype: a float16 scale would add its own rounding (2^-11
  relative) to every weight of the row.
- `int8_wo_linear` dequantizes the weight to the activation dtype and runs the plain matmul: what a
  weight-only kernel computes when it dequantizes tiles in registers.
- `fp8_linear` emulates an FP8 GEMM: the activations are quantized per token (row) to e4m3 with
  scale = amax / 448 (dynamic, from this call's values); the e4m3 products are summed in float32 (the
  tensor core's accumulator) and scaled by both scales, which is dequantizing both operands and
  multiplying in float32; the result is cast to the activation dtype. Every step is a tensor op with
  no host sync, so it runs inside a CUDA graph.
- SmoothQuant (`int8_sq`, W8A8): per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
  (`smoothing_factors`; max|X_j| from a calibration pass, max|W_j| over the rows of every weight the
  input feeds); the weight is stored as quantize_int8(W * s) and the activation enters as X / s, which
  leaves X @ W.T unchanged in exact arithmetic but moves the activations' outlier channels into the
  weights, where a per-channel scale absorbs them. A channel whose max|X_j| or max|W_j| is 0 gets s_j = 1.
- `int8_sq_linear` emulates the W8A8 GEMM exactly: the (smoothed) activation is quantized per token to
  int8 (scale = the token's amax / 127, dynamic), the int8 x int8 products are summed exactly (int32 on
  the CPU, float64 elsewhere: |sum| <= 127 * 127 * K < 2^31 for K < 133,000, so both are exact and
  agree), then converted to float32 and scaled by both scales (the int32 GEMM's epilogue), cast to the
  activation dtype, then + bias.
- Quantizing an activation inside the kernel that makes it (`rms_norm_quant`, `silu_and_mul_quant`) is
  that kernel's 16-bit output, then the per-token quantization above: the same bytes as the two steps,
  one launch and one write fewer. The matmul then takes the `QuantizedActivation` (`fp8_matmul`,
  `int8_sq_matmul`: the second halves of `fp8_linear` and `int8_sq_linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.kernels import reference

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def _scales(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """float32 scale = amax / qmax, and 1 where amax is 0 (an all-zero block)."""
    amax = amax.float()
    # A tensor divisor: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal, one
    # unit off the IEEE quotient the kernels (and the CPU) compute.
    return torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """weight [N, K] as [N, G, g] blocks (G = K // g; one block per row when group_size is None)."""
    rows, cols = weight.shape
    size = cols if group_size is None else group_size
    if size < 1 or cols % size:
        raise ValueError(f"group size {group_size} does not divide the weight's {cols} inputs")
    return weight.reshape(rows, cols // size, size)


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scale float32 [N] per channel, or [N, K // group_size] per group)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    blocks = _grouped(weight.float(), group_size)
    scale = _scales(blocks.abs().amax(dim=-1), INT8_MAX)  # [N, G]
    q = torch.round(blocks / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(weight.shape), (scale[:, 0] if group_size is None else scale)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [N, K] with scale [N] or [N, G] -> q * scale in `dtype` (computed in float32, then cast)."""
    rows, cols = q.shape
    groups = scale.reshape(rows, -1)
    blocks = _grouped(q, cols // groups.shape[1])
    return (blocks.float() * groups.float()[..., None]).reshape(rows, cols).to(dtype)


def int8_wo_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, K] @ dequantize_int8(q, scale).T (+ bias) -> [T, N], in x's dtype (the weight dequantized to it)."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype), bias)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q float8_e4m3fn [N, K], scale float32 [N]): per output channel."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    return quantize_fp8_rows(weight)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [T, K] to e4m3 with its own scale: (q float8_e4m3fn [T, K], scale float32 [T]).

    The per-token activation quantization of `fp8_linear` and the per-channel weight quantization
    are the same rule over rows. |x / scale| <= 448 by construction; the clamp only guards rounding."""
    x32 = x.float()
    scale = _scales(x32.abs().amax(dim=-1), FP8_MAX)
    q = (x32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q float8_e4m3fn [N, K] with a per-row scale [N] -> q * scale in `dtype` (float32 math)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


@dataclass(frozen=True, slots=True)
class QuantizedActivation:
    """An activation quantized per token by the kernel that made it: q [T, K] int8 or e4m3, scale float32
    [T], and `dtype`, the 16-bit dtype it stands for (the matmul's output dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def quantize_activation(
    x: torch.Tensor, dtype: torch.dtype, smooth: torch.Tensor | None = None
) -> QuantizedActivation:
    """x [T, K] (divided by `smooth` first when given) quantized per token to int8 or e4m3."""
    x32 = x.float() if smooth is None else x.float() / smooth.float()
    if dtype == torch.int8:
        q, scale = quantize_int8_rows(x32)
    elif dtype == FP8_DTYPE:
        q, scale = quantize_fp8_rows(x32)
    else:
        raise ValueError(f"activations quantize to int8 or float8_e4m3fn, not {dtype}")
    return QuantizedActivation(q, scale, x.dtype)


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, dtype: torch.dtype
) -> tuple[QuantizedActivation, torch.Tensor | None]:
    """`reference.rms_norm`, its output quantized per token: (activation, new residual)."""
    out, new_residual = reference.rms_norm(x, weight, eps, residual)
    return quantize_activation(out.reshape(-1, out.shape[-1]), dtype), new_residual


def silu_and_mul_quant(
    x: torch.Tensor, dtype: torch.dtype, smooth: torch.Tensor | None = None
) -> QuantizedActivation:
    """`reference.silu_and_mul` of x [T, 2I], divided by `smooth` [I] when given, quantized per token."""
    return quantize_activation(reference.silu_and_mul(x), dtype, smooth)


def fp8_matmul(
    a: QuantizedActivation, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The FP8 GEMM over an e4m3 activation: both operands dequantized, the product in float32, cast to
    a.dtype, then + bias (in that dtype). a.q [T, K], q [N, K], scale [N] -> [T, N]."""
    out = torch.matmul(a.q.float(), q.float().t()) * a.scale[:, None] * scale.float()[None, :]
    out = out.to(a.dtype)
    return out if bias is None else out + bias


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The FP8 GEMM's numerics: x quantized per token to e4m3, then `fp8_matmul`. x [T, K], q [N, K],
    scale [N] -> [T, N] in x's dtype."""
    return fp8_matmul(quantize_activation(x, FP8_DTYPE), q, scale, bias)


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s [K] = act_amax^alpha / weight_amax^(1 - alpha), float32; 1 where either is 0.

    act_amax: max |X_j| per input channel from calibration; weight_amax: max |W_j| per input channel
    over every output row the input feeds (for a fused layer, all its parts' rows)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    act, wgt = act_amax.double(), weight_amax.double()
    s = act.pow(alpha) / wgt.pow(1.0 - alpha)
    return torch.where((act > 0) & (wgt > 0), s, torch.ones_like(s)).float()


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [T, K] to int8 with its own scale amax / 127: (q int8 [T, K], scale float32 [T]).

    The per-token dynamic activation quantization of `int8_sq_linear` (and the same rule as
    quantize_int8's per-channel weights)."""
    x32 = x.float()
    scale = _scales(x32.abs().amax(dim=-1), INT8_MAX)
    q = torch.round(x32 / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [T, K] @ b int8 [N, K].T summed exactly -> int32 [T, N] (int32 on the CPU, float64 elsewhere)."""
    if a.device.type == "cpu":
        return torch.matmul(a.to(torch.int32), b.to(torch.int32).t())
    return torch.matmul(a.to(torch.float64), b.to(torch.float64).t()).to(torch.int32)


def int8_sq_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The W8A8 GEMM's numerics: x [T, K] (divided by `smooth` [K] when given: the explicit smoothing of
    a layer with no norm to fold it into) quantized per token to int8, times q int8 [N, K] summed
    exactly, * x_scale * scale in float32, cast to x's dtype, then + bias -> [T, N]."""
    return int8_sq_matmul(quantize_activation(x, torch.int8, smooth), q, scale, bias)


def int8_sq_matmul(
    a: QuantizedActivation, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The W8A8 GEMM over an int8 activation: a.q x q summed exactly, * a.scale * scale in float32, cast
    to a.dtype, then + bias."""
    out = int8_matmul(a.q, q).float() * a.scale[:, None] * scale.float()[None, :]
    out = out.to(a.dtype)
    return out if bias is None else out + bias
