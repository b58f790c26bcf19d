"""RMSNorm in Triton, fused with the residual add that precedes it in every Llama block.

Rules (the same as `kiln.kernels.reference.rms_norm`): without a residual, returns
(norm(x) * weight, None); with one, s = x + residual rounded to x's dtype, returns
(norm(s) * weight, s). The mean of squares is taken in float32; the normalised row is rounded to
x's dtype before the weight multiply (Hugging Face's LlamaRMSNorm), and the output has the dtype
torch gives `weight * x`. One program normalises one row in a single pass: a Llama hidden size
(<= 16384) fits in registers, so x and the residual are each read once and the sum written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
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
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of x [..., hidden], optionally adding `residual` first (see module doc)."""
    hidden = x.shape[-1]
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("rms_norm needs the hidden dimension contiguous")
    x2 = x.reshape(-1, hidden)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = None
    res2 = x2
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        new_residual = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2,
            res2,
            weight,
            out,
            new_residual if new_residual is not None else out,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            LAUNCH_DEPENDENTS=pdl_enabled(x.device),
            num_warps=min(16, max(1, block // 512)),
        )
    out = out.view(x.shape)
    return out, (new_residual.view(x.shape) if new_residual is not None else None)
