"""Matrix-vector product for one token (batch-1 decode) in Triton.

A batch-1 decode step is weight streaming: every projection reads its whole weight once and does two
FLOPs per element, so all that matters is how close the read gets to HBM bandwidth. For these shapes
cuBLAS picks GEMM kernels that reach 1.9-2.5 TB/s on an H100 (benchmarks/gemv.py). Here each program owns
BLOCK_N output rows and reads a whole row chunk of up to 4,096 elements in one load, so every warp has
many bytes in flight and thousands of programs keep the memory system busy: 2.4-2.9 TB/s on the same
shapes, 4.85 ms against cuBLAS's 5.69 ms for a Llama-2-7B step's GEMVs.

Measured and left out: folding RMSNorm or SiLU-and-mul into the GEMV's input made it slower (each of
the thousands of programs re-reads the whole input vector), more than the separate kernel it saves;
a gated variant that read rows i of the gate and up halves and wrote silu(gate_i) * up_i saved the
activation kernel but lost as much in its GEMV (5.08 ms per 7B token with and without it).
A QKV GEMV that finished the rotary embedding and the KV store in its epilogue (saving that launch)
ran 36.2 us against 33.5 for the plain 7B QKV GEMV: with only 16 KB to stream, a program feels the
dependent loads of the position and then the cos/sin row (5.06 against 5.07 ms a token; run Z3).

On Hopper the GEMV is launched with programmatic dependent launch (`kiln.kernels.pdl`): its
programs stream their first weight chunk while the kernel before it (RMSNorm, attention, SiLU) is still
running, and wait for it only before reading x. Batch-1 decode of a 7B model: 4.94 ms a token against
5.07 without (docs/results/2026-11-25-h100/README.md, run Z4).

Rules (the reference is `torch.nn.functional.linear`): x holds one token, W is [N, K] with K
contiguous, products accumulate in float32 and the output has W's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled


@triton.jit
def _weight_chunk(w_rows, row_ok, k0, K, EVEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [BLOCK_N, BLOCK_K] of the weight from column k0; read once, so evicted first."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        return tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
    mask = row_ok[:, None] & (cols < K)[None, :]
    return tl.load(w_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _input_chunk(x_ptr, k0, K, EVEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[k0 : k0 + BLOCK_K] in float32; every program re-reads it, so it is kept in cache."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        return tl.load(x_ptr + cols, eviction_policy="evict_last").to(tl.float32)
    return tl.load(x_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    N,
    K,
    stride_w,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kiln.kernels.pdl)
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    if PDL:
        # The first weight chunk streams in while the kernel before this one finishes; the input
        # vector is that kernel's output, so it is read only after the wait.
        w = _weight_chunk(w_rows, row_ok, 0, K, EVEN, BLOCK_K)
        tl.extra.cuda.gdc_wait()
        acc = w.to(tl.float32) * _input_chunk(x_ptr, 0, K, EVEN, BLOCK_K)[None, :]
        first = BLOCK_K
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        first = 0
    for k0 in range(first, K, BLOCK_K):
        w = _weight_chunk(w_rows, row_ok, k0, K, EVEN, BLOCK_K)
        acc += w.to(tl.float32) * _input_chunk(x_ptr, k0, K, EVEN, BLOCK_K)[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): two rows per program, K in chunks of up to 4,096.
    The best of the sweep, or within 1%, on every Llama-2-7B shape (benchmarks/gemv.py, H100); in the
    model, batch-1 decode measured the same as with one row per program and 8 warps."""
    block_k = min(4096, triton.next_power_of_2(k))
    return 2, block_k, 16 if block_k >= 4096 else 8 if block_k >= 2048 else 4, 1


def gemv(
    x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """weight @ x for one token: x [1, K] -> [1, N] in weight's dtype."""
    n, k = weight.shape
    if x.shape[0] != 1 or weight.stride(1) != 1:
        raise ValueError("gemv takes one token and a weight whose K dimension is contiguous")
    if x.shape[-1] != k:
        raise ValueError(f"gemv input has {x.shape[-1]} features, expected {k}")
    x = x.contiguous()
    out = torch.empty((1, n), dtype=weight.dtype, device=weight.device)
    block_n, block_k, num_warps, num_stages = config or default_config(n, k)
    pdl = pdl_enabled(weight.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        out,
        n,
        k,
        weight.stride(0),
        EVEN=n % block_n == 0 and k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    return out
