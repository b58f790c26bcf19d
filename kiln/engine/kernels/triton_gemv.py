"""Matrix-vector product for one token (batch-1 decode) in Triton.

A batch-1 decode step is weight streaming: every projection reads its whole weight once and does two
FLOPs per element, so all that matters is how close the read gets to HBM bandwidth. For these shapes
cuBLAS picks GEMM kernels that reach 1.9-2.5 TB/s on an H100 (bench/gemv.py). Here each program owns
BLOCK_N output rows and reads whole row chunks of up to 4,096 elements in one load, so every warp has
many bytes in flight and thousands of programs keep the memory system busy: 2.4-2.9 TB/s on the same
shapes, 4.86 ms against cuBLAS's 5.69 ms for a Llama-2-7B step's GEMVs.

The gate/up projection can also finish the SwiGLU (`gated`): each program reads rows i of both halves
and writes silu(gate_i) * up_i, so the activation needs no kernel of its own. Measured and left out:
folding RMSNorm or SiLU-and-mul into a GEMV's *input* made it slower (each of the thousands of
programs re-reads the whole input vector), more than the separate kernel it saves.

Rules (the references are `torch.nn.functional.linear`, and `silu_and_mul` of it when gated): x
holds one token, W is [N, K] with K contiguous, products accumulate in float32, and the output has W's
dtype, rounded where the unfused kernels round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    N,  # output features (with GATED, of the product: the weight has 2N rows)
    K,
    stride_w,
    GATED: tl.constexpr,  # out = silu(W[:N] @ x) * (W[N:] @ x), each program owning rows of both halves
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    up_rows = w_rows + N * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        # The weight is read once (evict first); the input vector is re-read by every program.
        if EVEN:
            x = tl.load(x_ptr + cols, eviction_policy="evict_last").to(tl.float32)[None, :]
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
            if GATED:
                up = tl.load(up_rows + cols[None, :], eviction_policy="evict_first")
        else:
            col_ok = cols < K
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last")
            x = x.to(tl.float32)[None, :]
            w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            if GATED:
                up = tl.load(up_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x
        if GATED:
            up_acc += up.to(tl.float32) * x
    dtype = out_ptr.dtype.element_ty
    y = tl.sum(acc, axis=1).to(dtype)
    if GATED:
        # The unfused path's roundings: both projections to the dtype, silu rounded before the multiply.
        gate = y.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        y = (silu * tl.sum(up_acc, axis=1).to(dtype).to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows, y, mask=row_ok)


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): two rows per program, K in chunks of up to 4,096.
    The best of the sweep, or within 1%, on every Llama-2-7B shape (bench/gemv.py, H100)."""
    block_k = min(4096, triton.next_power_of_2(k))
    return 2, block_k, 16 if block_k >= 4096 else 8 if block_k >= 2048 else 4, 1


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: tuple[int, int, int, int] | None = None,
    *,
    gated: bool = False,
) -> torch.Tensor:
    """weight @ x for one token: x [1, K] -> [1, N] in weight's dtype. With `gated`, weight is a fused
    [gate; up] of 2N rows and the result silu(gate @ x) * (up @ x) [1, N] (SiLU-and-mul folded in)."""
    rows, k = weight.shape
    if x.shape[0] != 1 or weight.stride(1) != 1:
        raise ValueError("gemv takes one token and a weight whose K dimension is contiguous")
    if x.shape[-1] != k:
        raise ValueError(f"gemv input has {x.shape[-1]} features, expected {k}")
    if gated and rows % 2:
        raise ValueError(f"a gated gemv needs an even number of weight rows, got {rows}")
    n = rows // 2 if gated else rows
    x = x.contiguous()
    out = torch.empty((1, n), dtype=weight.dtype, device=weight.device)
    block_n, block_k, num_warps, num_stages = config or default_config(n, k)
    if gated:
        block_n = max(1, block_n // 2)  # two weight tiles per program: the same bytes in flight
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        out,
        n,
        k,
        weight.stride(0),
        GATED=gated,
        EVEN=n % block_n == 0 and k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
