"""RMSNorm in Triton, fused with the residual add that precedes it in every Llama block.

Rules (the same as `kiln.kernels.reference.rms_norm`): without a residual, returns
(norm(x) * weight, None); with one, s = x + residual rounded to x's dtype, returns
(norm(s) * weight, s). The mean of squares is taken in float32; the normalised row is rounded to
x's dtype before the weight multiply (Hugging Face's LlamaRMSNorm), and the output has the dtype
torch gives `weight * x`. One program normalises one row in a single pass: a Llama hidden size
(<= 16384) fits in registers, so x and the residual are each read once and the sum written once.

`rms_norm_quant` is the same kernel ending in the per-token quantization of its output for the 8-bit
matmul after it (the rules of `kiln.kernels.triton_quant_act`: IEEE divisions, ties to even for int8):
the 16-bit row is never written, and its quantization needs no second pass, since the row is in
registers. Its bytes are those of `rms_norm` followed by `triton_quant_act.quantize_rows` (the unfused
path), bit for bit; against the reference (`quant_reference.rms_norm_quant`) it inherits rms_norm's tolerance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled
from kiln.kernels.quant_reference import QuantizedActivation
from kiln.kernels.triton_quant_act import QMAX, quantize_values

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,  # QUANT: the quantized row, with its scale at scale_ptr
    new_residual_ptr,
    scale_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    OUT_DTYPE: tl.constexpr,  # the normalised row's dtype (what QUANT quantizes, rounded to it first)
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
    TO_INT8: tl.constexpr,
    BLOCK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,  # PDL: the next kernel may start now (kiln.kernels.pdl)
):
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=valid, other=0.0)
        # Round the sum to x's dtype first: the reference adds in x's dtype.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + offs, x, mask=valid)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=valid, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(OUT_DTYPE)
    if QUANT:
        q, scale = quantize_values(out.to(tl.float32), QMAX, TO_INT8)
        tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * stride_o + offs, q.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(out_ptr + row * stride_o + offs, out, mask=valid)


def _launch(x, weight, eps, residual, quant_dtype):
    hidden = x.shape[-1]
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("rms_norm needs the hidden dimension contiguous")
    x2 = x.reshape(-1, hidden)
    rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=quant_dtype or out_dtype, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device) if quant_dtype else out
    new_residual = None
    res2 = x2
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        new_residual = torch.empty_like(x2)
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2,
            res2,
            weight,
            out,
            new_residual if new_residual is not None else out,
            scale,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            OUT_DTYPE=_TL_DTYPES[out_dtype],
            QUANT=quant_dtype is not None,
            QMAX=QMAX.get(quant_dtype, 1.0),
            TO_INT8=quant_dtype == torch.int8,
            BLOCK=block,
            LAUNCH_DEPENDENTS=pdl_enabled(x.device),
            num_warps=min(16, max(1, block // 512)),
        )
    return out, scale, (new_residual.view(x.shape) if new_residual is not None else None)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of x [..., hidden], optionally adding `residual` first (see module doc)."""
    out, _, new_residual = _launch(x, weight, eps, residual, None)
    return out.view(x.shape), new_residual


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, dtype: torch.dtype
) -> tuple[QuantizedActivation, torch.Tensor | None]:
    """`rms_norm` of x [T, hidden] quantized per token to `dtype` (int8 or e4m3): (activation, residual)."""
    if dtype not in QMAX:
        raise ValueError(f"rms_norm_quant makes int8 or float8_e4m3fn, not {dtype}")
    q, scale, new_residual = _launch(x, weight, eps, residual, dtype)
    return QuantizedActivation(q, scale, torch.promote_types(weight.dtype, x.dtype)), new_residual
