"""SiLU-and-multiply (SwiGLU) in Triton: one read of the fused gate_up output, one write of the product.

Rule (the same as `kiln.kernels.reference.silu_and_mul`): x is [..., 2I] with the gate in
the first half and the up projection in the second; returns silu(gate) * up [..., I] in x's dtype.
silu is computed in float32 and rounded to x's dtype before the multiply, as torch's F.silu does.
`silu_mul` is that rule for other kernels (`triton_quant_act.silu_and_mul_quant` quantizes the product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    inter,
    BLOCK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,  # PDL: the next kernel may start now (kiln.kernels.pdl)
):
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def silu_mul(gate, up, DTYPE: tl.constexpr):
    """silu(gate) * up from float32 inputs in DTYPE, silu rounded to DTYPE first (the module's rule)."""
    silu = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
    return (silu * up).to(DTYPE)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I]; returns a new contiguous [..., I] tensor."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, 2 * inter)
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2,
            out,
            x2.stride(0),
            out.stride(0),
            inter,
            BLOCK=block,
            LAUNCH_DEPENDENTS=pdl_enabled(x.device),
            num_warps=4,
        )
    return out.view(*x.shape[:-1], inter)
