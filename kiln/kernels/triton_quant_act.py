"""Dynamic per-token quantization of activations in Triton: each row of x to int8 or FP8 E4M3 with its own scale.

The first half of the W8A8 (`int8_sq`) and FP8 GEMMs: their matmuls take 8-bit activations, quantized at
run time from this step's values, one scale per token (row). One program quantizes one row in two passes
over it (the absolute maximum, then the quantized values): a row is at most a few tens of KB, so the
second pass reads it from L1/L2, and any row length works (Llama-3-70B's 28,672 inputs included).

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
- Nothing here syncs with the host or depends on values for its shapes, so CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled

_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@triton.jit
def _smoothed_chunk(x_row, smooth_ptr, cols, K, HAS_SMOOTH: tl.constexpr):
    """x[cols] in float32, divided by smooth[cols] when there is one (0 past the row's end)."""
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
    BLOCK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,  # PDL: the next kernel may start now (kiln.kernels.pdl)
):
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = _smoothed_chunk(x_row, smooth_ptr, k0 + tl.arange(0, BLOCK), K, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.abs(x))
    row_max = tl.max(amax, axis=0)
    scale = tl.where(row_max > 0, tl.div_rn(row_max, QMAX), 1.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        v = tl.div_rn(_smoothed_chunk(x_row, smooth_ptr, cols, K, HAS_SMOOTH), scale)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if TO_INT8:
            v = _round_half_even(v)
        tl.store(q_ptr + row * stride_q + cols, v.to(q_ptr.dtype.element_ty), mask=cols < K)


def quantize_rows(
    x: torch.Tensor, dtype: torch.dtype, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (divided by `smooth` [K] first when given) -> (q [T, K] in `dtype`, scale float32 [T]).

    `dtype` is torch.int8 (the reference `quantize_int8_rows`) or torch.float8_e4m3fn
    (`quantize_fp8_rows`); see the module rules."""
    if dtype not in _QMAX:
        raise ValueError(f"quantize_rows makes int8 or float8_e4m3fn, not {dtype}")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes x [T, K], got shape {tuple(x.shape)}")
    rows, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if smooth is not None and (smooth.shape != (k,) or smooth.stride(0) != 1):
        raise ValueError(f"smooth must be a contiguous [{k}] tensor, got shape {tuple(smooth.shape)}")
    q = torch.empty((rows, k), dtype=dtype, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = min(4096, triton.next_power_of_2(k))
        _quantize_rows_kernel[(rows,)](
            x,
            smooth if smooth is not None else scale,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            QMAX=_QMAX[dtype],
            TO_INT8=dtype == torch.int8,
            HAS_SMOOTH=smooth is not None,
            BLOCK=block,
            LAUNCH_DEPENDENTS=pdl_enabled(x.device),
            num_warps=max(1, min(8, block // 256)),
        )
    return q, scale
