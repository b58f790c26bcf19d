"""Matrix-vector products for one token over 8-bit weights (batch-1 decode of a quantized engine), in Triton.

The structure of `kiln.kernels.triton_gemv` (read it first): each program owns BLOCK_N output rows and
reads chunks of BLOCK_K inputs of them (1,024 by default) in one load, evicted first (read once), while
the input vector is kept in cache (every program re-reads it); products accumulate in float32 and are summed once
at the end; on Hopper the kernel launches with programmatic dependent launch and streams its first weight
chunk before it waits for the kernel that writes its input. Batch-1 decode is weight streaming, so an
8-bit weight is half the bytes of a 16-bit one and the GEMV should take about half the time: the
dequantization has to stay cheap enough that the loop remains bound by memory, not instructions.

Three weight layouts, one kernel (constexpr switches):
- int8 weight-only, per channel: sum_k q[n, k] * x[k] in float32, times scale[n] once at the end (the
  integers are exact in float32, so this is the reference's product without its rounding of the
  dequantized weight to x's dtype: as exact or more).
- int8 weight-only, per group of G inputs (G a power of two): each chunk's products are summed per group
  and multiplied by that group's scale before they join the accumulator (G >= BLOCK_K: one group per
  chunk). Group sizes that are not a power of two are run by the reference (the dispatch's rule).
- FP8 E4M3 weight, per channel: "FP8 GEMV" here means x stays in its 16-bit dtype and multiplies the
  e4m3 weight (exactly widened to float32), times scale[n] at the end: a weight-only GEMV. Batch 1 is
  bound by the weight bytes, which are the same either way; quantizing the activation first would add
  a kernel launch per projection and a rounding of x to 3 mantissa bits for no speed. This is more
  accurate than the reference `fp8_linear` (which quantizes x per token to e4m3), so it matches it
  within that activation rounding (~3% relative), and `F.linear(x, dequantize_fp8(q, s))` tightly.
- W8A8 (`int8_sq`): x is already int8 (quantized per token by `kiln.kernels.triton_quant_act`, with its
  float32 scale); the int8 products are summed exactly in int32, then * x_scale * scale[n] in float32 in
  the reference's order: the result is the reference `int8_sq_linear`'s bit for bit but for rare
  one-unit roundings.

The output is x's dtype (for W8A8, the dtype asked for), cast before the bias is added (in that dtype), as
the references do. Nothing syncs with the host; CUDA graphs capture it.

Widening a weight byte to float32 takes conversion instructions (int8: one I2F an element; e4m3: one
e4m3x2 -> f16x2 per pair, then a float16 -> float32 step an element), which Hopper issues at an eighth
of its FMA rate, close to what streaming 8-bit weights at full bandwidth needs. `bit_widen` builds the
float32 from the byte's bits with integer operations instead (the output is the same, bit for bit):
- int8 v: the float32 with bits 0x4B000000 | (v + 128) is 2^23 + v + 128, exactly; subtracting 2^23 + 128
  leaves v (exact: both are in [2^23, 2^24)).
- e4m3: its sign to bit 31 and its exponent and mantissa to bits 30..20 give a float32 of the same
  exponent field, which is the e4m3 value times 2^-120, subnormals included (both formats' subnormals have
  the exponent of field 1). x is multiplied by 2^60 and the sum by 2^60 again: powers of two, so every
  product and partial sum is the conversion path's times 2^-60, rounded alike, and none is subnormal.
`triton_quant_gemm` widens int8 tiles to 16 bits the same way with `bit_widen` (`int8_to_16_bits`).
Which is faster is measured, not assumed (`benchmarks.quant_gemv` times both). On an H100 the int8 GEMV
is faster by its bits (a Llama-2-7B step's GEMVs 2.70 against 2.73 ms; batch-1 decode 3.08 against 3.14
ms a token) and the e4m3 one by its conversions (2.66 against 2.71 ms; 3.27 against 3.74 ms a token with
the earlier tile): the defaults follow. KILN_WIDEN_BITS=1 or 0 (read once, at import) forces either in
both kernels, to compare whole engines (`kiln bench --latency-only --quantization ...`) without a code
change.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import pdl_enabled
from kiln.kernels.switches import env_switch

_WIDEN_BITS = env_switch("KILN_WIDEN_BITS", None)  # on / off in both kernels, to compare


def widen_by_bits(measured_default: bool) -> bool:
    """Whether a kernel widens 8-bit weights by their bits: KILN_WIDEN_BITS where it is set, else the
    kernel's measured default for the weight's dtype."""
    return measured_default if _WIDEN_BITS is None else _WIDEN_BITS


FP8_BIT_SCALE: tl.constexpr = tl.constexpr(2.0**60)  # x's and the sum's factor with bit_widen (module doc)


@triton.jit
def int8_to_float32_by_bits(w):
    """int8 values as float32 by integer operations: float32(0x4B000000 | (v + 128)) - (2^23 + 128), exact."""
    u = w.to(tl.uint8, bitcast=True).to(tl.int32)
    return ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def int8_to_16_bits(w, dtype: tl.constexpr):
    """int8 values as float16 by integer operations (float16(0x6400 | (v + 128)) - 1152, exact), where
    Triton converts each with two conversion instructions; bfloat16 by Triton's own conversion, which
    already is such a trick (a byte permute and one bfloat16x2 subtraction a pair)."""
    if dtype == tl.float16:
        u = w.to(tl.uint8, bitcast=True).to(tl.uint16)
        magic = ((u ^ 0x80) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        wide = magic - tl.full([], 1152.0, tl.float16)
    else:
        wide = w.to(dtype)
    return wide


@triton.jit
def _widen(w, BITS: tl.constexpr, FP8_W: tl.constexpr):
    """8-bit weights as float32: conversion instructions, or with BITS integer operations on the bits (the
    e4m3 value then comes times 2^-120; see the module doc)."""
    if BITS:
        if FP8_W:
            # The byte at bits 31..24, shifted arithmetically to 27..20: sign copies fill 31..27; keep
            # bit 31 and the exponent and mantissa (mask 0x87F00000, as a negative int32).
            u = w.to(tl.uint8, bitcast=True).to(tl.int32)
            wide = (((u << 24) >> 4) & -2014314496).to(tl.float32, bitcast=True)
        else:
            wide = int8_to_float32_by_bits(w)
    else:
        wide = w.to(tl.float32)
    return wide


@triton.jit
def _chunk_sum(
    w, x_ptr, scale_rows, row_ok, k0, K, G,
    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, INT_X: tl.constexpr, BITS: tl.constexpr, FP8_W: tl.constexpr,
):  # fmt: skip
    """One chunk's contribution: products [BLOCK_N, BLOCK_K] (int32 for W8A8, else float32), or per
    group (GROUP > 0) the products summed per group and scaled, [BLOCK_N, groups in the chunk]."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        x = tl.load(x_ptr + cols, eviction_policy="evict_last")
    else:
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0, eviction_policy="evict_last")
    # One return, at the end: Triton's compiler goes on past a `return` under a constexpr `if`, so the
    # grouped branch would be compiled (and divide by GROUP = 0) for every layout.
    xf = x.to(tl.float32)
    if BITS and FP8_W:
        xf = xf * FP8_BIT_SCALE
    if INT_X:
        out = w.to(tl.int32) * x.to(tl.int32)[None, :]
    elif GROUP == 0:
        out = _widen(w, BITS, FP8_W) * xf[None, :]
    else:
        products = _widen(w, BITS, FP8_W) * xf[None, :]
        PER_CHUNK: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1
        SPAN: tl.constexpr = GROUP if BLOCK_K >= GROUP else BLOCK_K
        groups = k0 // GROUP + tl.arange(0, PER_CHUNK)
        scale = tl.load(scale_rows + groups[None, :], mask=row_ok[:, None] & (groups < G)[None, :], other=0.0)
        out = tl.sum(tl.reshape(products, [BLOCK_N, PER_CHUNK, SPAN]), axis=2) * scale
    return out


@triton.jit
def _weight_chunk(w_rows, row_ok, k0, K, EVEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [BLOCK_N, BLOCK_K] of the 8-bit weight from column k0; read once, so evicted first."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
    else:
        mask = row_ok[:, None] & (cols < K)[None, :]
        w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _quant_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, x_scale_ptr, bias_ptr, out_ptr,
    N, K, G, stride_w, stride_s,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,  # inputs per scale group (a power of two); 0: one scale per row
    INT_X: tl.constexpr,  # W8A8: x is int8 with a float32 scale, products summed in int32
    BITS: tl.constexpr,  # widen the weight by its bits, not conversion instructions (bit_widen)
    FP8_W: tl.constexpr,  # the weight is e4m3
    HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kiln.kernels.pdl)
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    scale_rows = scale_ptr + rows.to(tl.int64)[:, None] * stride_s
    # The first chunk streams in before the wait (weights and scales are never written by a step);
    # x and its scale are the previous kernel's output, read only after it.
    w = _weight_chunk(w_rows, row_ok, 0, K, EVEN, BLOCK_K)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = _chunk_sum(w, x_ptr, scale_rows, row_ok, 0, K, G, EVEN, BLOCK_N, BLOCK_K, GROUP, INT_X, BITS, FP8_W)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _weight_chunk(w_rows, row_ok, k0, K, EVEN, BLOCK_K)
        acc += _chunk_sum(
            w, x_ptr, scale_rows, row_ok, k0, K, G, EVEN, BLOCK_N, BLOCK_K, GROUP, INT_X, BITS, FP8_W
        )
    total = tl.sum(acc, axis=1)
    if BITS and FP8_W:
        total = total * FP8_BIT_SCALE
    if INT_X:
        total = total.to(tl.float32) * tl.load(x_scale_ptr)
    if GROUP == 0:
        total = total * tl.load(scale_ptr + rows * stride_s, mask=row_ok, other=0.0)
    out = total.to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        out = (out.to(tl.float32) + tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)).to(
            out_ptr.dtype.element_ty
        )
    tl.store(out_ptr + rows, out, mask=row_ok)


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): two rows of 1,024 inputs a program, 2 warps: small
    programs, many of them. Of `benchmarks.quant_gemv --sweep`'s tiles on an H100 it is the fastest for
    int8 and within 0.4% of the fastest for FP8, at Llama-2-7B's and Llama-3.1-8B's projections; a 7B
    step's GEMVs take 6-7% less time than with four rows of 2,048 in 8 warps, the default before. Any
    power-of-two group fits a power-of-two BLOCK_K: one divides the other."""
    return 2, min(1024, triton.next_power_of_2(k)), 2, 1


def quant_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int, int] | None = None,
    bit_widen: bool | None = None,
) -> torch.Tensor:
    """One token x [1, K] (or [K]) through an 8-bit weight [N, K] (K contiguous) -> [1, N].

    weight int8 with scale float32 [N] (per channel) or [N, K // G] (per group, G a power of two), or
    float8_e4m3fn with scale [N]; x in float16/bfloat16. With `x_scale` (float32, one element) x is the
    int8 per-token-quantized input of a W8A8 layer, and `out_dtype` the output dtype (else x's).
    `bit_widen` widens a weight-only product's weights by integer operations (see the module doc; None:
    on for int8 weights, off for e4m3, unless KILN_WIDEN_BITS says otherwise)."""
    n, k = weight.shape
    if x.numel() != k:
        raise ValueError(f"quant_gemv takes one token of {k} features, got shape {tuple(x.shape)}")
    if weight.stride(1) != 1 or weight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError("quant_gemv needs an int8 or float8_e4m3fn weight whose K dimension is contiguous")
    groups = scale.shape[1] if scale.dim() == 2 else 1
    group = k // groups if scale.dim() == 2 and groups > 1 else 0
    if scale.dtype != torch.float32 or scale.shape[0] != n or (groups > 1 and k % groups):
        raise ValueError(f"scale must be float32 [{n}] or [{n}, G] with G dividing {k}")
    if group and (group & (group - 1) or weight.dtype != torch.int8):
        raise ValueError(f"per-group scales need an int8 weight and a power-of-two group, got {group}")
    int_x = x_scale is not None
    if int_x != (x.dtype == torch.int8) or (int_x and weight.dtype != torch.int8):
        raise ValueError("an int8 x (W8A8) comes with its x_scale and an int8 weight, and only then")
    x = x.reshape(-1).contiguous()
    out = torch.empty((1, n), dtype=out_dtype or x.dtype, device=weight.device)
    block_n, block_k, num_warps, num_stages = config or default_config(n, k)
    pdl = pdl_enabled(weight.device)
    _quant_gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        scale,
        x_scale if int_x else scale,
        bias if bias is not None else out,
        out,
        n,
        k,
        groups,
        weight.stride(0),
        scale.stride(0),
        EVEN=n % block_n == 0 and k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP=group,
        INT_X=int_x,
        BITS=(widen_by_bits(weight.dtype == torch.int8) if bit_widen is None else bit_widen) and not int_x,
        FP8_W=weight.dtype == torch.float8_e4m3fn,
        HAS_BIAS=bias is not None,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    return out
