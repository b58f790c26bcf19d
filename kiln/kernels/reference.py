"""PyTorch reference kernels: the semantics every Triton kernel must match, and the CPU path.

They favour clarity over speed (the attention loops over requests on the host), but never loop
over tokens in Python. Shapes: T tokens in a step, Hq query heads, Hkv KV heads, D head dim.
The paged KV cache of one layer is a pair of tensors [num_blocks, block_size, Hkv, D]; token slot
s lives at block s // block_size, offset s % block_size (see kiln.kernels.attention_metadata).

An fp8 KV cache (float8_e4m3fn tensors, kiln.config.KVCacheConfig) comes with the layer's k_scale and
v_scale (float32 [1]): `store_kv` writes `quantize_kv(x, scale)` and `paged_attention` reads
`dequantize_kv(stored, scale)`. A 16-bit cache takes no scales; `check_kv_scales` refuses a mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.config import FP8_E4M3_MAX
from kiln.kernels.attention_metadata import AttentionMetadata

FP8_KV_DTYPE = torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / scale, -448, 448)): the division in float32, the cast rounding to nearest even."""
    return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """stored * scale in float32 (every e4m3 value is exact in float32)."""
    return stored.float() * scale.float()


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> bool:
    """True for an fp8 cache with both scales, False for a 16-bit cache with none; ValueError otherwise
    (an fp8 cache without scales, scales for a cache that is not fp8, or a scale that is not one value)."""
    fp8 = k_cache.dtype == FP8_KV_DTYPE
    given = (k_scale is not None, v_scale is not None)
    if fp8 and given != (True, True):
        raise ValueError("an fp8 KV cache needs its k_scale and v_scale")
    if not fp8 and given != (False, False):
        raise ValueError(f"k_scale / v_scale apply to an fp8 KV cache only, not a {k_cache.dtype} one")
    if fp8 and (k_scale.numel() != 1 or v_scale.numel() != 1):  # type: ignore[union-attr]
        raise ValueError("k_scale and v_scale are per-tensor: one value each")
    return fp8


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
    """Write token t's key/value [T, Hkv, D] into the caches at slot_mapping[t]; slots of -1 are skipped.

    Values are cast to the cache dtype; into an fp8 cache they are `quantize_kv(x, scale)` with the
    layer's scales. Slots must be distinct (a slot written twice in one call holds one of the two values,
    unspecified which).
    """
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    # Index by (block, offset) rather than through a flattened view, so it also works when the
    # cache tensors are non-contiguous slices of a larger allocation.
    if fp8:
        k_cache[blocks, offsets] = quantize_kv(key[keep], k_scale)  # type: ignore[arg-type]
        v_cache[blocks, offsets] = quantize_kv(value[keep], v_scale)  # type: ignore[arg-type]
        return
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


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
    """Causal attention of each request's new tokens over its paged context; returns [T, Hq, D].

    Request i owns query rows query_start_loc[i]:query_start_loc[i+1] (q_len of them) and a context
    of seq_lens[i] tokens found through block_tables[i]; its new token j sits at position
    seq_lens[i] - q_len + j and attends to context positions <= its own. This one rule covers full
    prefill, a prefill chunk after a cached prefix, and decode (q_len 1). The new tokens' K/V must
    already be in the cache (`store_kv` first). Query head h reads KV head h // (Hq // Hkv).
    Scores and softmax are float32; the output has the query's dtype. Rows past
    query_start_loc[-1] (padding) are zeros. An fp8 cache is read as `dequantize_kv(stored, scale)`
    with the layer's k_scale / v_scale: exactly attention over the dequantized float32 cache.
    """
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    _, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    group = num_q_heads // num_kv_heads
    block_size = meta.block_size
    output = torch.zeros_like(query)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start, end = starts[i], starts[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if q_len > seq_len:
            raise ValueError(f"request {i} has {q_len} new tokens but a context of only {seq_len}")
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks].to(device=k_cache.device, dtype=torch.long)
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        # [Hkv, group, q_len, D] against [Hkv, 1, seq_len, D]: GQA without repeating K/V.
        q = query[start:end].float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        if fp8:
            keys, values = dequantize_kv(keys, k_scale), dequantize_kv(values, v_scale)  # type: ignore[arg-type]
        k = keys.float().permute(1, 0, 2).unsqueeze(1)
        v = values.float().permute(1, 0, 2).unsqueeze(1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        query_positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
        key_positions = torch.arange(seq_len, device=query.device)
        future = key_positions[None, :] > query_positions[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        attended = torch.matmul(probs, v)  # [Hkv, group, q_len, D]
        output[start:end] = attended.permute(2, 0, 1, 3).reshape(q_len, num_q_heads, head_dim).to(query.dtype)
    return output


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim, optionally fused with the residual add before it.

    Without `residual`: returns (norm(x) * weight, None). With it: s = x + residual (in x's dtype),
    returns (norm(s) * weight, s), so the caller carries s as the next residual (vLLM's
    fused_add_rms_norm). The normalisation runs in float32 and is cast back to x's dtype before
    the weight multiply, exactly as Hugging Face's LlamaRMSNorm.
    """
    new_residual = None
    if residual is not None:
        x = x + residual
        new_residual = x
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused [T, 2I] gate_up output: silu(x[:, :I]) * x[:, I:] -> [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] by their positions [T]; returns new tensors.

    cos_sin_cache is [max_pos, D], row p = [cos(p * f) | sin(p * f)] (kiln.models.rope). Dimension i
    pairs with i + D/2 (Hugging Face rotate_half / NeoX style). cos/sin are cast to the query's
    dtype before use, as Hugging Face does, so half-precision results match it.
    """
    cos, sin = cos_sin_cache[positions].to(query.dtype).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(query), rotate(key)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight [N, K].T (+ bias) -> [T, N]: torch's own linear layer."""
    return F.linear(x, weight, bias)


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set every logit whose bit in `mask` ([rows, words] int32, on the logits' device) is 0 to -inf;
    tokens past the mask's width (the model's padded vocabulary) are never allowed."""
    width = mask.shape[1] * 32
    shifts = torch.arange(32, device=mask.device, dtype=torch.int32)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(mask.shape[0], width).bool()
    vocab = logits.shape[1]
    if vocab > width:
        logits[:, width:] = float("-inf")
    logits[:, : min(vocab, width)].masked_fill_(~allowed[:, :vocab], float("-inf"))
