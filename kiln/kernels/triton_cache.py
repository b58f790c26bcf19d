"""Writing a step's keys and values into the paged KV cache, with or without the rotary embedding.

Rules (the same as `kiln.kernels.reference`):
- `store_kv`: token t's key/value [T, Hkv, D] go to cache slot slot_mapping[t] (block
  slot // block_size, offset slot % block_size); slot -1 (padding) is skipped; values are cast to
  the cache dtype.
- `apply_rotary`: NeoX / Hugging Face rotate_half pairing (dimension i with i + D/2) with
  cos/sin read from row positions[t] of cos_sin_cache [max_pos, D] = [cos | sin], cast to the
  query's dtype first. Each product and sum is rounded to that dtype as torch's half-precision
  arithmetic does, so results match the reference bit for bit on most inputs.
- `rotary_store_kv`: both in one launch — rotates query and key, stores the rotated key and the
  value, returns only the rotated query. The rotated key is never written anywhere but the cache,
  which saves one write and one read of it per layer (attention reads keys from the cache anyway).
- Into an fp8 cache (float8_e4m3fn, with the layer's k_scale / v_scale) a value x goes in as
  e4m3(clamp(x / scale, -448, 448)): x widened to float32, an IEEE division (div_rn, as torch divides),
  the cast rounding to nearest even; bit for bit `reference.quantize_kv` of the same x. The scales are
  read from device memory inside the kernel, so a CUDA graph replays with their current values.

One program handles every head of one token; inputs may be strided views (e.g. slices of a fused
QKV projection) as long as the head dimension is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.config import FP8_E4M3_MAX
from kiln.kernels.reference import check_kv_scales

FP8_MAX: tl.constexpr = tl.constexpr(FP8_E4M3_MAX)


@triton.jit
def _rotate(x1, x2, cos, sin, DTYPE: tl.constexpr):
    """(x1*cos - x2*sin, x2*cos + x1*sin), rounding each product and sum to DTYPE like torch does."""
    a = (x1 * cos).to(DTYPE).to(tl.float32)
    b = (x2 * sin).to(DTYPE).to(tl.float32)
    c = (x2 * cos).to(DTYPE).to(tl.float32)
    d = (x1 * sin).to(DTYPE).to(tl.float32)
    return (a - b).to(DTYPE), (c + d).to(DTYPE)


@triton.jit
def _to_cache(x, scale_ptr, CACHE_DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """x in the cache's dtype: a cast, or with SCALED (an fp8 cache) e4m3(clamp(x / scale, ±448))."""
    if SCALED:
        x = tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr))
        x = tl.clamp(x, -FP8_MAX, FP8_MAX)
    return x.to(CACHE_DTYPE)


@triton.jit
def _rotated_heads(
    x_ptr,
    stride_t,
    stride_h,
    token,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
):
    """Both rotated halves [HEADS_P2, HALF_P2] of one token's heads, in x's dtype."""
    heads = tl.arange(0, HEADS_P2)
    offs = tl.arange(0, HALF_P2)
    valid = (heads[:, None] < NUM_HEADS) & (offs[None, :] < HALF)
    src = x_ptr + token * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=valid, other=0.0).to(tl.float32)
    return _rotate(x1, x2, cos, sin, x_ptr.dtype.element_ty)


@triton.jit
def _head_offsets(stride_h, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    return tl.arange(0, HEADS_P2)[:, None] * stride_h + tl.arange(0, HALF_P2)[None, :]


@triton.jit
def _rotary_kernel(
    positions_ptr,
    cos_sin_ptr,
    stride_cs,
    q_ptr,
    stride_qt,
    stride_qh,
    q_out_ptr,
    stride_qot,
    stride_qoh,
    k_ptr,
    stride_kt,
    stride_kh,
    k_out_ptr,  # apply_rotary: [T, Hkv, D]; rotary_store_kv: the key cache
    stride_kot,
    stride_kos,
    stride_koh,
    v_ptr,
    stride_vt,
    stride_vh,
    v_cache_ptr,
    stride_vcb,
    stride_vcs,
    stride_vch,
    slot_ptr,
    block_size,
    k_scale_ptr,
    v_scale_ptr,
    NUM_Q_HEADS: tl.constexpr,
    Q_HEADS_P2: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_P2: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    TO_CACHE: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Rotate one token's query and key heads; with TO_CACHE, the key (and the value) go to its slot
    (with SCALED, quantized to the fp8 cache by the scales)."""
    token = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    offs = tl.arange(0, HALF_P2)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=offs < HALF, other=0.0).to(dtype)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=offs < HALF, other=0.0).to(dtype)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]

    q_valid = (tl.arange(0, Q_HEADS_P2)[:, None] < NUM_Q_HEADS) & (offs[None, :] < HALF)
    q1, q2 = _rotated_heads(
        q_ptr, stride_qt, stride_qh, token, cos, sin, NUM_Q_HEADS, Q_HEADS_P2, HALF, HALF_P2
    )
    q_dst = q_out_ptr + token * stride_qot + _head_offsets(stride_qoh, Q_HEADS_P2, HALF_P2)
    tl.store(q_dst, q1, mask=q_valid)
    tl.store(q_dst + HALF, q2, mask=q_valid)

    kv_valid = (tl.arange(0, KV_HEADS_P2)[:, None] < NUM_KV_HEADS) & (offs[None, :] < HALF)
    k1, k2 = _rotated_heads(
        k_ptr, stride_kt, stride_kh, token, cos, sin, NUM_KV_HEADS, KV_HEADS_P2, HALF, HALF_P2
    )
    if TO_CACHE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // block_size
            offset = slot % block_size
            k_dst = k_out_ptr + block * stride_kot + offset * stride_kos
            k_dst += _head_offsets(stride_koh, KV_HEADS_P2, HALF_P2)
            k_dtype = k_out_ptr.dtype.element_ty
            tl.store(k_dst, _to_cache(k1, k_scale_ptr, k_dtype, SCALED), mask=kv_valid)
            tl.store(k_dst + HALF, _to_cache(k2, k_scale_ptr, k_dtype, SCALED), mask=kv_valid)
            v_src = v_ptr + token * stride_vt + _head_offsets(stride_vh, KV_HEADS_P2, HALF_P2)
            v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs
            v_dst += _head_offsets(stride_vch, KV_HEADS_P2, HALF_P2)
            v1 = tl.load(v_src, mask=kv_valid)
            v2 = tl.load(v_src + HALF, mask=kv_valid)
            v_dtype = v_cache_ptr.dtype.element_ty
            tl.store(v_dst, _to_cache(v1, v_scale_ptr, v_dtype, SCALED), mask=kv_valid)
            tl.store(v_dst + HALF, _to_cache(v2, v_scale_ptr, v_dtype, SCALED), mask=kv_valid)
    else:
        k_dst = k_out_ptr + token * stride_kot + _head_offsets(stride_koh, KV_HEADS_P2, HALF_P2)
        tl.store(k_dst, k1, mask=kv_valid)
        tl.store(k_dst + HALF, k2, mask=kv_valid)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    block_size,
    k_scale_ptr,
    v_scale_ptr,
    NUM_HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SCALED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, HEAD_DIM_P2)[None, :]
    valid = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=valid)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims
    tl.store(k_dst, _to_cache(k, k_scale_ptr, k_cache_ptr.dtype.element_ty, SCALED), mask=valid)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=valid)
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims
    tl.store(v_dst, _to_cache(v, v_scale_ptr, v_cache_ptr.dtype.element_ty, SCALED), mask=valid)


def _check_inner(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("KV-cache kernels need the head dimension contiguous")


def _launch_store(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    num_tokens, num_heads, head_dim = value.shape
    if num_tokens == 0:
        return
    scaled = k_scale is not None
    if not scaled:  # unused operands: any tensor will do
        k_scale = v_scale = slot_mapping
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_cache.shape[1],
        k_scale,
        v_scale,
        NUM_HEADS=num_heads,
        HEADS_P2=triton.next_power_of_2(num_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=triton.next_power_of_2(head_dim),
        SCALED=scaled,
        num_warps=4,
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [T, Hkv, D] into the caches at slot_mapping [T]; slots of -1 are skipped. An fp8
    cache needs the layer's k_scale / v_scale (see the module rules)."""
    _check_inner(key, value, k_cache, v_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    _launch_store(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _launch_rotary(
    positions,
    cos_sin_cache,
    query,
    q_out,
    key,
    k_out,
    value,
    v_cache,
    slot_mapping,
    k_scale=None,
    v_scale=None,
) -> None:
    """One launch; k_out is a [T, Hkv, D] tensor, or the key cache when v_cache is given."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if num_tokens == 0:
        return
    to_cache = v_cache is not None
    scaled = k_scale is not None
    if not scaled:  # unused operands: any tensor will do
        k_scale = v_scale = positions
    if not to_cache:  # unused operands: any tensor will do
        value, v_cache, slot_mapping = key, k_out, positions
        k_strides = (k_out.stride(0), 0, k_out.stride(1))
    else:
        k_strides = (k_out.stride(0), k_out.stride(1), k_out.stride(2))
    _rotary_kernel[(num_tokens,)](
        positions,
        cos_sin_cache,
        cos_sin_cache.stride(0),
        query,
        query.stride(0),
        query.stride(1),
        q_out,
        q_out.stride(0),
        q_out.stride(1),
        key,
        key.stride(0),
        key.stride(1),
        k_out,
        *k_strides,
        value,
        value.stride(0),
        value.stride(1),
        v_cache,
        v_cache.stride(0),
        v_cache.stride(1) if to_cache else 0,
        v_cache.stride(2) if to_cache else 0,
        slot_mapping,
        k_out.shape[1] if to_cache else 1,
        k_scale,
        v_scale,
        NUM_Q_HEADS=num_q_heads,
        Q_HEADS_P2=triton.next_power_of_2(num_q_heads),
        NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_P2=triton.next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
        HALF_P2=triton.next_power_of_2(head_dim // 2),
        TO_CACHE=to_cache,
        SCALED=scaled,
        num_warps=4,
    )


def apply_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] by positions [T]; returns new contiguous tensors."""
    _check_inner(query, key, cos_sin_cache)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    _launch_rotary(positions, cos_sin_cache, query, q_out, key, k_out, None, None, None)
    return q_out, k_out


def rotary_store_kv(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`apply_rotary` then `store_kv` of the rotated key and the value; returns the rotated query only.
    An fp8 cache needs the layer's k_scale / v_scale (see the module rules)."""
    _check_inner(query, key, value, cos_sin_cache, k_cache, v_cache)
    check_kv_scales(k_cache, k_scale, v_scale)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _launch_rotary(
        positions, cos_sin_cache, query, q_out, key, k_cache, value, v_cache, slot_mapping, k_scale, v_scale
    )
    return q_out
