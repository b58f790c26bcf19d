"""Matrix-vector products for one token (batch-1 decode) in Triton, with the elementwise work around
them folded in.

A batch-1 decode step is weight streaming: every GEMV reads its whole weight once and does two FLOPs
per element, so the only thing that matters is how close the read gets to HBM bandwidth. cuBLAS picks
split-K GEMM kernels for these shapes that reach ~2.7 TB/s on an H100. Here each program owns
BLOCK_N output rows and walks the whole K dimension, so no partial sums leave the program: no split-K
reduction pass, and the input vector's elementwise producer can run inside the loop (`PROLOGUE`):

- PROLOGUE 0: y = W @ x.
- PROLOGUE 1 (RMSNorm): y = W @ (norm(x) * g). The sum of squares is accumulated in the same loop
  that reads x, and the 1/rms factor is applied once to the finished dot product.
- PROLOGUE 2 (SiLU-and-mul): x is [2K] (gate, up); y = W @ (silu(gate) * up).
- RESIDUAL: the output is rounded to the dtype, then the residual added (y + r, rounded again), which
  is what `linear` followed by an add gives.

Rules (the reference is `kiln.engine.kernels.reference.gemv`): x holds one token, W is [N, K] with K
contiguous, products accumulate in float32. The prologues skip the roundings to the model dtype the
unfused kernels make between steps, so results agree with the reference to dtype tolerance, not bit
for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PROLOGUE_NONE, PROLOGUE_RMS_NORM, PROLOGUE_SILU_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    norm_weight_ptr,
    residual_ptr,
    N,
    K,
    stride_w,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    square_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            x = tl.load(x_ptr + cols, eviction_policy="evict_last").to(tl.float32)
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
        else:
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
            w = tl.load(
                w_rows + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
        if PROLOGUE == 1:
            square_sum += x * x
            if EVEN:
                g = tl.load(norm_weight_ptr + cols, eviction_policy="evict_last")
            else:
                g = tl.load(norm_weight_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")
            x = x * g.to(tl.float32)
        if PROLOGUE == 2:
            if EVEN:
                up = tl.load(x_ptr + K + cols, eviction_policy="evict_last")
            else:
                up = tl.load(x_ptr + K + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")
            x = x / (1.0 + tl.exp(-x)) * up.to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y * tl.rsqrt(tl.sum(square_sum, axis=0) / K + eps)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows, mask=row_ok, other=0.0)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@functools.cache
def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight."""
    return 4, 1024, 4, 1


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """W @ f(x) (+ residual) for one token: x [1, K] (or [1, 2K] with silu_mul) -> [1, N]."""
    n, k = weight.shape
    if x.shape[0] != 1 or weight.stride(1) != 1:
        raise ValueError("gemv takes one token and a weight whose K dimension is contiguous")
    if norm_weight is not None and silu_mul:
        raise ValueError("gemv applies one prologue at most")
    expected_k = 2 * k if silu_mul else k
    if x.shape[-1] != expected_k:
        raise ValueError(f"gemv input has {x.shape[-1]} features, expected {expected_k}")
    x = x.contiguous()
    out = torch.empty((1, n), dtype=weight.dtype, device=weight.device)
    block_n, block_k, num_warps, num_stages = config or default_config(n, k)
    prologue = (
        PROLOGUE_RMS_NORM if norm_weight is not None else PROLOGUE_SILU_MUL if silu_mul else PROLOGUE_NONE
    )
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        out,
        norm_weight if norm_weight is not None else x,
        residual.contiguous() if residual is not None else x,
        n,
        k,
        weight.stride(0),
        eps,
        PROLOGUE=prologue,
        HAS_RESIDUAL=residual is not None,
        EVEN=n % block_n == 0 and k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
