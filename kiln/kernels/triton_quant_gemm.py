"""Matrix products of several tokens with 8-bit weights (int8 or FP8 E4M3), in Triton: weight-only (8-bit
tiles widened to 16 bits inside the K loop), W8A8 (int8 x int8 tensor-core products summed in int32) and
FP8 x FP8 (e4m3 x e4m3 summed in float32), and the epilogue of cuBLAS's int8 GEMM (`torch._int_mm`).

Why a GEMM of its own for int8 weight-only: cuBLAS has no mixed int8 x fp16 GEMM, and dequantizing the
whole weight to a 16-bit temporary before cuBLAS would read the weight once, write it twice as large and
read that again (5 bytes an element instead of 1): at decode batches, which are bound by the weight
bytes, that is slower than the 16-bit engine it is meant to beat. Here each program loads an int8 tile
[BLOCK_N, BLOCK_K] and widens it in registers before the tensor-core dot, so the weight crosses HBM once
as 1 byte an element at every batch size.

Rules (the references: `quant_reference.int8_wo_linear`, `int8_sq_linear`):
- Weight-only, per channel: the int8 values enter the dot exactly (int8 fits float16 and bfloat16), the
  float32 sums are multiplied by scale[n] at the end; per group (G a power of two >= 16): BLOCK_K <= G, so
  a tile lies in one group, and it is dequantized as the reference does, (q * scale) in float32 rounded to
  x's dtype, before the dot. x is float16 or bfloat16 (float32 would run the dot in TF32: the dispatch
  sends it to the reference).
- W8A8: x is int8 (per-token, from `kiln.kernels.triton_quant_act`) with float32 scales [M]; the products
  are summed exactly in int32, then (sum * x_scale[m]) * scale[n] in float32, the reference's order.
- FP8 x FP8: x is e4m3 (per-token, `triton_quant_act`) with float32 scales [M], the weight e4m3 per
  channel; float32 sums, then * x_scale[m] * scale[n]: the reference `fp8_linear`'s order. Hopper's e4m3
  tensor-core accumulator keeps fewer bits than float32 (Triton's sm_90 default sums a whole K loop in it),
  so its partial sum is added to a true float32 one once per K tile (gemm_config's BLOCK_K, 512 at most):
  summed whole, K = 11008 was 2.4e-3 off the exact product, above one float16 rounding. Promoting every 128
  or 256 inputs instead cost the decode-batch tile (BLOCK_K 512) 8% (quant_small_m). An e4m3 weight
  with a 16-bit x is widened exactly (kiln.kernels.triton_fp8), the weight-only form of the same product.
- SWAP puts the weight tile first in the dot ([BLOCK_N, BLOCK_K] x [BLOCK_K, BLOCK_M]) and transposes the
  result: the same sums, in the layout a tensor core's M side wants when a decode batch has 16 tokens or
  fewer (wgmma needs M >= 64). Which tiles pay is measured by benchmarks/quant_small_m.py.
- The output is cast to its dtype before the bias is added, as the references do.
- Tiles are fixed per batch size (`gemm_config`), not autotuned: an autotuner times candidates on its
  first call, which cannot happen inside a CUDA-graph capture. Nothing syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_fp8 import fp8_via_float32, is_hopper, widen
from kiln.kernels.triton_quant_gemv import int8_to_16_bits, int8_to_float32_by_bits, widen_by_bits


@triton.jit
def _epilogue(acc, rm, rn, M, N, scale_ptr, a_scale_ptr, bias_ptr, c_ptr, stride_cm,
              SCALE_N: tl.constexpr, SCALE_M: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """acc [BM, BN] -> (acc * a_scale[m]) * scale[n] in float32 (each when asked), cast, + bias, stored."""
    out = acc.to(tl.float32)
    if SCALE_M:
        out = out * tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if SCALE_N:
        out = out * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    out = out.to(c_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + bias[None, :]).to(c_ptr.dtype.element_ty)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], out, mask=mask)


@triton.jit
def _quant_gemm_kernel(
    a_ptr, b_ptr, scale_ptr, a_scale_ptr, bias_ptr, c_ptr,
    M, N, K, stride_am, stride_bn, stride_s, stride_cm,
    GROUP: tl.constexpr,  # weight-only: inputs per scale group (BLOCK_K divides it); 0: per channel
    SCALED_A: tl.constexpr,  # a is quantized like the weight (int8 or e4m3) with float32 scales [M]
    SWAP: tl.constexpr,  # the weight tile is the dot's first operand (see gemm_config)
    FP8_VIA_F32: tl.constexpr,  # an e4m3 weight widened through float32 (kiln.kernels.triton_fp8)
    BITS: tl.constexpr,  # an int8 weight-only tile widened by integer operations (bit_widen)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped program order: GROUP_M row tiles walk the same column tiles together, so a weight tile is
    # still in L2 when the next row tile needs it.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rk[None, :]
    INT: tl.constexpr = SCALED_A and a_ptr.dtype.element_ty == tl.int8
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.int32 if INT else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk < K)[None, :]
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok, other=0.0)
        b = tl.load(b_ptrs, mask=(rn < N)[:, None] & k_ok, other=0.0)
        if not SCALED_A:
            if GROUP == 0:
                b = int8_to_16_bits(b, a.dtype) if BITS else widen(b, a.dtype, FP8_VIA_F32)
            else:
                s = tl.load(scale_ptr + rn.to(tl.int64) * stride_s + k0 // GROUP, mask=rn < N, other=0.0)
                wide = int8_to_float32_by_bits(b) if BITS else b.to(tl.float32)
                b = (wide * s[:, None]).to(a.dtype)
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc, out_dtype=acc.dtype, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=acc.dtype, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(acc, rm, rn, M, N, scale_ptr, a_scale_ptr, bias_ptr, c_ptr, stride_cm,
              GROUP == 0, SCALED_A, HAS_BIAS)  # fmt: skip


@triton.jit
def _scale_int32_kernel(
    acc_ptr, a_scale_ptr, scale_ptr, bias_ptr, c_ptr, M, N, stride_acc, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.load(acc_ptr + rm.to(tl.int64)[:, None] * stride_acc + rn[None, :], mask=mask, other=0)
    _epilogue(acc, rm, rn, M, N, scale_ptr, a_scale_ptr, bias_ptr, c_ptr, stride_cm, True, True, HAS_BIAS)


# Decode batches (<= 16 tokens) on Hopper, by operands (x quantized, weight dtype): the tile with the least
# time over a Llama-2-7B decode step's four projections in benchmarks/quant_small_m.py (H100, 2026-12-05).
# Their deep K tiles need Hopper's shared memory (up to 160 KB in four stages); earlier GPUs take
# SMALL_BATCH_TILE.
SMALL_BATCH_TILES: dict[tuple[bool, torch.dtype], tuple[int, int, int, int, int, int, bool]] = {
    (False, torch.int8): (16, 32, 256, 8, 4, 4, False),
    (False, torch.float8_e4m3fn): (16, 32, 512, 8, 4, 4, True),
    (True, torch.int8): (16, 32, 512, 8, 4, 4, False),
    (True, torch.float8_e4m3fn): (16, 64, 512, 8, 4, 4, True),
}
SMALL_BATCH_TILE = (16, 64, 128, 8, 4, 4, False)


def gemm_config(
    m: int,
    group: int = 0,
    *,
    quantized_x: bool = False,
    weight_dtype: torch.dtype = torch.int8,
    hopper: bool = True,
) -> tuple[int, int, int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SWAP) for M tokens. Decode batches
    (M <= 64) are weight streaming: narrow column tiles give enough programs to keep HBM busy, with deep
    K tiles and four stages in flight (up to 16 tokens on Hopper, the measured tile of the operand pair);
    larger M is compute-bound: 128 x 128 tiles, two warpgroups. A per-group weight caps BLOCK_K at its
    group size. SWAP makes the weight tile the dot's first operand (x's tile the second), the layout a
    tensor core wants when BLOCK_M is small."""
    if m <= 16:
        cfg = list(SMALL_BATCH_TILES[quantized_x, weight_dtype] if hopper else SMALL_BATCH_TILE)
    elif m <= 32:
        cfg = [32, 64, 128, 8, 4, 4, False]
    elif m <= 64:
        cfg = [64, 64, 128, 8, 4, 4, False]
    elif m <= 128:
        cfg = [64, 128, 64, 8, 4, 4, False]
    else:
        cfg = [128, 128, 64, 8, 8, 4, False]
    if group:
        cfg[2] = min(cfg[2], group)
    return tuple(cfg)  # type: ignore[return-value]


WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def quant_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int, int, int, bool] | None = None,
    bit_widen: bool | None = None,
) -> torch.Tensor:
    """x [M, K] @ 8-bit weight [N, K].T -> [M, N]. Weight-only: x float16/bfloat16, an int8 weight with
    scale float32 [N] or [N, K // G] (G a power of two >= 16), or an e4m3 weight with scale [N]. Both
    quantized (W8A8 with an int8 weight, FP8 with an e4m3 one): x has the weight's dtype and `x_scale`
    float32 [M], scale [N]; the output is `out_dtype` (else x's dtype). See the module rules.
    `bit_widen` widens an int8 weight-only tile by integer operations, not conversion instructions (the
    same values; kiln.kernels.triton_quant_gemv's module doc; None: off, its speed here unmeasured,
    unless KILN_WIDEN_BITS=1)."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.dtype not in WEIGHT_DTYPES or weight.stride(1) != 1:
        raise ValueError(f"quant_gemm needs an int8 or e4m3 weight [N, {k}] with K contiguous")
    groups = scale.shape[1] if scale.dim() == 2 else 1
    group = k // groups if groups > 1 else 0
    if group and (k % groups or group < 16 or group & (group - 1) or weight.dtype != torch.int8):
        raise ValueError(
            f"per-group scales need an int8 weight and a power-of-two group >= 16, got {k / groups:g}"
        )
    scaled_a = x_scale is not None
    if scaled_a != (x.dtype == weight.dtype) or (scaled_a and group):
        raise ValueError(
            "a quantized x comes with its x_scale, the weight's dtype and per-channel scales, and only then"
        )
    if not scaled_a and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quant_gemm takes float16 or bfloat16 activations, not {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, group_m, num_warps, num_stages, swap = config or gemm_config(
        m, group, quantized_x=scaled_a, weight_dtype=weight.dtype, hopper=is_hopper(x.device)
    )
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _quant_gemm_kernel[grid](
        x,
        weight,
        scale,
        x_scale if scaled_a else scale,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        scale.stride(0),
        out.stride(0),
        GROUP=group,
        SCALED_A=scaled_a,
        SWAP=swap,
        FP8_VIA_F32=not scaled_a and weight.dtype != torch.int8 and fp8_via_float32(x.device, x.dtype),
        BITS=(widen_by_bits(False) if bit_widen is None else bit_widen)
        and not scaled_a
        and weight.dtype == torch.int8,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def scale_int32(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The epilogue of an int32 GEMM (`torch._int_mm`): acc [M, N] -> (acc * x_scale[m]) * scale[n] in
    float32, cast to `out_dtype`, then + bias: one read of the int32 sums, one write of the output."""
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m:
        _scale_int32_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](
            acc,
            x_scale,
            scale,
            bias if bias is not None else out,
            out,
            m,
            n,
            acc.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_M=32,
            BLOCK_N=128,
            num_warps=4,
        )
    return out
