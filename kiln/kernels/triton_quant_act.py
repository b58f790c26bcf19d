"""Dynamic per-token quantization of activations in Triton: each row of x to int8 or FP8 E4M3 with its own scale.

The first half of the W8A8 (`int8_sq`) and FP8 GEMMs: their matmuls take 8-bit activations, quantized at
run time from this step's values, one scale per token (row). One program quantizes one row, in one of two
ways (`one_pass_pays`):
- in two passes over it in chunks of up to 4,096 (the absolute maximum, then the quantized values; the
  second pass reads the row from L1/L2): any row length works (Llama-3-70B's 28,672 inputs included);
- in one pass, the whole row held in registers (16 warps), for rows of more than 4,096 inputs that fill at
  least three quarters of their power-of-two block, up to 16,384. Measured on an H100 with Llama-3.1-8B's
  14,336 (its down projection's input, SiLU-and-mul fused, below): 27.6 against 32.6 µs at 512 tokens and
  248 against 331 µs at 8,192 (FP8). Llama-2-7B's 11,008, a block two thirds full, was slower in one pass
  at 8,192 tokens (262 against 229 µs), so it keeps two; so do rows of up to 4,096 (one pass
  was slower for Llama-3.1-8B's o_proj input at 256 and 8,192 tokens; docs/results/2026-12-06-h100).

Rules (the references are `quant_reference.quantize_int8_rows`, `quantize_fp8_rows` and the smoothing
division of `int8_sq_linear`):
- x is divided by `smooth` first when given (SmoothQuant's explicit smoothing of o_proj / down_proj),
  in float32; scale = amax / QMAX, and 1 for an all-zero row; q = x / scale, then int8: rounded half to
  even and clamped to [-127, 127]; fp8: clamped to [-448, 448] and cast (round to nearest even).
- Both divisions are IEEE-rounded (`tl.div_rn`), not the approximate division Triton emits for `/`:
  the scales and the 8-bit values are then bit-identical to the reference's, so the GEMM after this
  multiplies the very integers (or e4m3 values) the reference does.
- Under programmatic dependent launch (`kiln.kernels.pdl`) the kernel lets its dependent start at once:
  the quantized GEMV after it streams weights while this runs, and waits before it reads q or the scale.
- `silu_and_mul_quant` is the same kernel reading a gate_up row [2K] and quantizing silu(gate) * up
  (`triton_activation.silu_mul`'s rounding): SiLU-and-mul and the quantization of the down projection's
  input in one launch, the 16-bit product never written (`quant_reference.silu_and_mul_quant`).
- Nothing here syncs with the host or depends on values for its shapes, so CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled
from kiln.kernels.quant_reference import QuantizedActivation
from kiln.kernels.triton_activation import silu_mul

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
ONE_PASS_MAX = 16384  # the longest row a program holds in registers (module rules)


def one_pass_pays(k: int) -> bool:
    """Whether a row of `k` inputs is quantized in one pass (module rules): longer than 4,096 and filling
    at least three quarters of its power-of-two block, up to ONE_PASS_MAX."""
    block = triton.next_power_of_2(k)
    return k > 4096 and 4 * k >= 3 * block and block <= ONE_PASS_MAX


@triton.jit
def _smoothed_chunk(x_row, smooth_ptr, cols, K, HAS_SMOOTH: tl.constexpr, GATED: tl.constexpr):
    """x[cols] in float32 (GATED: silu(x[cols]) * x[K + cols] in x's dtype, a row of 2K), divided by
    smooth[cols] when there is one (0 past the row's end)."""
    if GATED:
        gate = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        up = tl.load(x_row + K + cols, mask=cols < K, other=0.0).to(tl.float32)
        x = silu_mul(gate, up, x_row.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
        x = tl.div_rn(x, s)
    return x


@triton.jit
def _round_half_even(v):
    """torch.round's rounding (ties to even) from floor alone, exact for |v| < 2^22: libdevice's rint
    would do, but Triton's interpreter has no libdevice, and this runs there too."""
    f = tl.floor(v)
    frac = v - f
    odd = f - 2.0 * tl.floor(f * 0.5) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)


@triton.jit
def quantize_chunk(v, scale, QMAX: tl.constexpr, TO_INT8: tl.constexpr):
    """float32 values / scale, clamped to [-QMAX, QMAX], and for int8 rounded half to even."""
    v = tl.div_rn(v, scale)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if TO_INT8:
        v = _round_half_even(v)
    return v


@triton.jit
def quantize_values(v, QMAX: tl.constexpr, TO_INT8: tl.constexpr):
    """A whole row held in registers (float32, 0 where masked): (its quantized values, still float32, and
    its scale), by the rules above; for kernels that end in the quantization of what they computed."""
    row_max = tl.max(tl.abs(v), axis=0)
    scale = tl.where(row_max > 0, tl.div_rn(row_max, QMAX), 1.0)
    return quantize_chunk(v, scale, QMAX, TO_INT8), scale


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    smooth_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_x,
    stride_q,
    QMAX: tl.constexpr,
    TO_INT8: tl.constexpr,  # int8 (rounded, clamped) or float8_e4m3fn (clamped, cast)
    HAS_SMOOTH: tl.constexpr,
    GATED: tl.constexpr,  # x is [T, 2K]: quantize silu(gate) * up (silu_and_mul_quant)
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,  # BLOCK >= K: the row is read once and held in registers
    LAUNCH_DEPENDENTS: tl.constexpr,  # PDL: the next kernel may start now (kiln.kernels.pdl)
):
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        v, scale = quantize_values(
            _smoothed_chunk(x_row, smooth_ptr, cols, K, HAS_SMOOTH, GATED), QMAX, TO_INT8
        )
        tl.store(scale_ptr + row, scale)
        tl.store(q_ptr + row * stride_q + cols, v.to(q_ptr.dtype.element_ty), mask=cols < K)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = _smoothed_chunk(x_row, smooth_ptr, k0 + tl.arange(0, BLOCK), K, HAS_SMOOTH, GATED)
            amax = tl.maximum(amax, tl.abs(x))
        row_max = tl.max(amax, axis=0)
        scale = tl.where(row_max > 0, tl.div_rn(row_max, QMAX), 1.0)
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            v = quantize_chunk(
                _smoothed_chunk(x_row, smooth_ptr, cols, K, HAS_SMOOTH, GATED), scale, QMAX, TO_INT8
            )
            tl.store(q_ptr + row * stride_q + cols, v.to(q_ptr.dtype.element_ty), mask=cols < K)


def quantize_rows(
    x: torch.Tensor, dtype: torch.dtype, smooth: torch.Tensor | None = None, *, gated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (divided by `smooth` [K] first when given) -> (q [T, K] in `dtype`, scale float32 [T]).
    With `gated`, x is [T, 2K] and what is quantized is silu(x[:, :K]) * x[:, K:] (`silu_and_mul_quant`).

    `dtype` is torch.int8 (the reference `quantize_int8_rows`) or torch.float8_e4m3fn
    (`quantize_fp8_rows`); see the module rules."""
    if dtype not in QMAX:
        raise ValueError(f"quantize_rows makes int8 or float8_e4m3fn, not {dtype}")
    if x.dim() != 2 or (gated and x.shape[1] % 2):
        raise ValueError(f"quantize_rows takes x [T, {'2K' if gated else 'K'}], got shape {tuple(x.shape)}")
    rows, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    if smooth is not None and (smooth.shape != (k,) or smooth.stride(0) != 1):
        raise ValueError(f"smooth must be a contiguous [{k}] tensor, got shape {tuple(smooth.shape)}")
    q = torch.empty((rows, k), dtype=dtype, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        one_pass = one_pass_pays(k)
        block = triton.next_power_of_2(k) if one_pass else min(4096, triton.next_power_of_2(k))
        _quantize_rows_kernel[(rows,)](
            x,
            smooth if smooth is not None else scale,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            QMAX=QMAX[dtype],
            TO_INT8=dtype == torch.int8,
            HAS_SMOOTH=smooth is not None,
            GATED=gated,
            BLOCK=block,
            ONE_PASS=one_pass,
            LAUNCH_DEPENDENTS=pdl_enabled(x.device),
            num_warps=16 if one_pass else max(1, min(8, block // 256)),
        )
    return q, scale


def silu_and_mul_quant(
    x: torch.Tensor, dtype: torch.dtype, smooth: torch.Tensor | None = None
) -> QuantizedActivation:
    """`triton_activation.silu_and_mul` of x [T, 2I] (divided by `smooth` [I] when given) quantized per
    token to `dtype`, in one launch: the 16-bit product is never written."""
    q, scale = quantize_rows(x, dtype, smooth, gated=True)
    return QuantizedActivation(q, scale, x.dtype)
