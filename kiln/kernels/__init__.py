"""Kernel dispatch: the model calls these names; each picks the Triton kernel on CUDA and the
PyTorch reference (kiln.kernels.reference) elsewhere.

Rules:
- Every function here has a reference with the same signature and semantics, and a GPU test
  comparing the two on random shapes (tests/gpu).
- The choice follows the device of the first tensor argument, so CPU code never imports Triton.
- KILN_KERNELS=reference forces the references on CUDA too (to compare or to bisect a bug);
  read once at import; any other value is an error.
- `paged_attention` on a Hopper GPU hands long fresh prompts to cuDNN's fused attention
  (`kiln.kernels.long_prompts`, which says when) and the rest of the step to the Triton kernel,
  whose decode tile may depend on the step's longest context (`decode_context_bounds` says where).
- `linear` runs the Triton GEMV only for one token without bias (batch-1 decode) and torch's
  linear (cuBLAS) otherwise: at any larger batch cuBLAS's GEMMs are the faster kernel.
- `rotary_store_kv` is apply_rotary + store_kv in one launch on CUDA (and exactly those two
  calls elsewhere); it returns only the rotated query, since attention reads keys from the cache.
- An fp8 KV cache (float8_e4m3fn) is written and read with the layer's `k_scale` / `v_scale`
  (float32 [1] device tensors, read inside the kernels, so CUDA graphs see a later change); a 16-bit
  cache takes none. `store_kv`, `rotary_store_kv` and `paged_attention` raise ValueError for a mismatch
  (`reference.check_kv_scales`), on every device.
- `int8_wo_linear`, `fp8_linear` and `int8_sq_linear` are the quantized matmuls; their references are
  in kiln.kernels.quant_reference, and `triton_quant_linear` picks the CUDA kernel for each number of
  tokens (and says what it hands back to the reference). At one token the FP8 GEMV keeps x in 16 bits
  rather than quantizing it: more accurate than its reference, within that reference's activation
  rounding (see triton_quant_gemv).
- `rms_norm_quant` and `silu_and_mul_quant` end in the per-token quantization the 8-bit matmul after
  them needs, and hand a `QuantizedActivation` to `fp8_matmul` / `int8_sq_matmul` (the second halves
  of `fp8_linear` / `int8_sq_linear`): the same numbers as the unfused calls, bit for bit.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from kiln.kernels import long_prompts, quant_reference, reference
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.quant_reference import QuantizedActivation
from kiln.kernels.tiles import head_dim_p2

_KERNELS = os.environ.get("KILN_KERNELS", "").strip().lower()
if _KERNELS not in ("", "reference"):
    raise ValueError(
        f"KILN_KERNELS={os.environ['KILN_KERNELS']!r}: it takes only 'reference' (unset: Triton on CUDA)"
    )
_FORCE_REFERENCE = _KERNELS == "reference"


@functools.cache
def _triton(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"kiln.kernels.triton_{name}")


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and not _FORCE_REFERENCE


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
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if _use_triton(key):
        return _triton("cache").store_kv(key, value, k_cache, v_cache, slot_mapping, **scales)
    return reference.store_kv(key, value, k_cache, v_cache, slot_mapping, **scales)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if _use_triton(query):
        offloaded = (
            long_prompts.offloaded_requests(meta) if long_prompts.device_offloads(query, k_cache) else []
        )
        out = _triton("attention").paged_attention(
            query, k_cache, v_cache, meta, scale, **scales, offloaded=offloaded
        )
        for request in offloaded:
            long_prompts.attend_fresh_prompt(query, k_cache, v_cache, meta, scale, request, out)
        return out
    return reference.paged_attention(query, k_cache, v_cache, meta, scale, **scales)


def decode_context_bounds(k_cache: torch.Tensor) -> tuple[int, ...]:
    """The longest-context bounds, ascending, at which `paged_attention`'s decode tile over this cache
    changes; a CUDA graph of decode steps is valid for every length but fast only within its class, so
    the engine captures one family of decode graphs per class. Empty on the reference path."""
    if _use_triton(k_cache):
        fp8_cache = k_cache.dtype == reference.FP8_KV_DTYPE
        return _triton("attention").decode_context_bounds(head_dim_p2(k_cache.shape[-1]), fp8_cache=fp8_cache)
    return ()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if _use_triton(x):
        return _triton("norm").rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _triton("activation").silu_and_mul(x)
    return reference.silu_and_mul(x)


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """A structured output's allowed tokens: every logit of [rows, vocab] whose bit in the int32 [rows,
    words] mask is 0, or past the mask's 32 * words tokens, becomes -inf, in place."""
    if _use_triton(logits):
        return _triton("bitmask").apply_token_bitmask(logits, mask)
    return reference.apply_token_bitmask(logits, mask)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight.T (+ bias). One token without bias takes the Triton GEMV on CUDA (the batch-1
    decode step's projections); everything else is torch's linear (cuBLAS)."""
    if bias is None and x.shape[0] == 1 and x.dim() == 2 and _use_triton(x) and weight.stride(1) == 1:
        return _triton("gemv").gemv(x, weight)
    return reference.linear(x, weight, bias)


def apply_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(query):
        return _triton("cache").apply_rotary(positions, query, key, cos_sin_cache)
    return reference.apply_rotary(positions, query, key, cos_sin_cache)


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
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if _use_triton(query):
        return _triton("cache").rotary_store_kv(
            positions, query, key, value, cos_sin_cache, k_cache, v_cache, slot_mapping, **scales
        )
    reference.check_kv_scales(k_cache, k_scale, v_scale)  # before the rotation: refuse, compute nothing
    query, key = reference.apply_rotary(positions, query, key, cos_sin_cache)
    reference.store_kv(key, value, k_cache, v_cache, slot_mapping, **scales)
    return query


def int8_wo_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use_triton(x):
        return _triton("quant_linear").int8_wo_linear(x, q, scale, bias)
    return quant_reference.int8_wo_linear(x, q, scale, bias)


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use_triton(x):
        return _triton("quant_linear").fp8_linear(x, q, scale, bias)
    return quant_reference.fp8_linear(x, q, scale, bias)


def int8_sq_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if _use_triton(x):
        return _triton("quant_linear").int8_sq_linear(x, q, scale, smooth, bias)
    return quant_reference.int8_sq_linear(x, q, scale, smooth, bias)


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, dtype: torch.dtype
) -> tuple[QuantizedActivation, torch.Tensor | None]:
    if _use_triton(x):
        return _triton("norm").rms_norm_quant(x, weight, eps, residual, dtype)
    return quant_reference.rms_norm_quant(x, weight, eps, residual, dtype)


def silu_and_mul_quant(
    x: torch.Tensor, dtype: torch.dtype, smooth: torch.Tensor | None = None
) -> QuantizedActivation:
    if _use_triton(x):
        return _triton("quant_act").silu_and_mul_quant(x, dtype, smooth)
    return quant_reference.silu_and_mul_quant(x, dtype, smooth)


def fp8_matmul(
    a: QuantizedActivation, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use_triton(a.q):
        return _triton("quant_linear").fp8_matmul(a, q, scale, bias)
    return quant_reference.fp8_matmul(a, q, scale, bias)


def int8_sq_matmul(
    a: QuantizedActivation, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use_triton(a.q):
        return _triton("quant_linear").int8_sq_matmul(a, q, scale, bias)
    return quant_reference.int8_sq_matmul(a, q, scale, bias)


__all__ = [
    "QuantizedActivation",
    "apply_rotary",
    "fp8_linear",
    "fp8_matmul",
    "int8_sq_linear",
    "int8_sq_matmul",
    "int8_wo_linear",
    "linear",
    "paged_attention",
    "rms_norm",
    "rms_norm_quant",
    "rotary_store_kv",
    "silu_and_mul",
    "silu_and_mul_quant",
    "store_kv",
]
