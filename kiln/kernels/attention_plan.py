"""How a paged-attention launch is cut: tile shapes, the sequence split count, and the split counters.

Host-side companions of `triton_attention` (no kernels here): the untuned and tuned tile shapes, the
split rule (powers of two, each a compile-time constant of the kernel), the SM count, and the zeroed
workspace of per-tile counters with which the last split of a tile knows to merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from kiln.kernels.tiles import AttentionConfig, tuned_config

_NUM_SMS_CACHE: dict[int, int] = {}
_MIN_COUNTERS = 1 << 14
# Split counters per device: grow-only, and a replaced workspace is kept alive, because captured CUDA
# graphs hold its address.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []


def num_sms(device: torch.device) -> int:
    """The SM count that decides the split (cached per device)."""
    if device.type != "cuda":
        return 132  # Triton's CPU interpreter (debugging): pretend to be an H100
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS_CACHE:
        _NUM_SMS_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS_CACHE[index]


# A mixed step (prompts and decodes) whose first requests decode, at least this many, runs them in a
# launch of decode tiles of their own; the rest in prefill tiles. A prefill tile holds BLOCK_Q tokens'
# query heads (128 rows), of which a decoding request fills one token's group, so its K/V tiles pay 8 to
# 32 times a decode tile's products and softmax. On an H100 (docs/results/2026-12-06-h100, calls 39-40) the
# split took 255 decodes beside a prompt from 167 to 125 us a layer, and 511 over an fp8 cache from 1,509
# to 706. Over short contexts its GPU time stops losing at 96-128 decodes (the second launch costs more
# than it saves below), and a step of that many decodes is bound by the GPU, not by the launches' host time.
# Over an fp8 cache, where decode is bound by instructions, long contexts pay from fewer decodes: 16 to 128
# decodes of 1,000-2,100 keys beside a 1,000-token prompt gained 21-40% (154 to 121 us a layer at 16).
MIN_SPLIT_DECODES = 128
MIN_SPLIT_LONG_FP8_DECODES = 16
LONG_FP8_DECODE_KEYS = 1000  # the leading decodes' mean context from which MIN_SPLIT_LONG_FP8_DECODES holds


def split_leading_decodes(num_decodes: int, seq_lens: Sequence[int], *, fp8_cache: bool) -> bool:
    """Whether a mixed step's `num_decodes` leading decodes (contexts `seq_lens[:num_decodes]`, host
    copies) take a launch of decode tiles of their own (the rules above)."""
    if num_decodes >= MIN_SPLIT_DECODES:
        return True
    if not fp8_cache or num_decodes < MIN_SPLIT_LONG_FP8_DECODES:
        return False
    return sum(seq_lens[:num_decodes]) >= num_decodes * LONG_FP8_DECODE_KEYS


# Decode over an fp8 cache whose longest context is at most this many keys takes the short-context tile.
SHORT_FP8_DECODE_KEYS = 512


def default_config(
    decode: bool, head_dim_p2: int, *, fp8_cache: bool = False, max_seq_len: int | None = None
) -> AttentionConfig:
    """The tile shape used unless the caller passes one: the engine directory's tuned choice when
    `kiln.kernels.tiles.apply_profile` installed one for this head size (tuned over the engine's own
    cache dtype), else `builtin_config`."""
    return tuned_config(decode, head_dim_p2) or builtin_config(
        decode, head_dim_p2, fp8_cache=fp8_cache, max_seq_len=max_seq_len
    )


def builtin_config(
    decode: bool, head_dim_p2: int, *, fp8_cache: bool = False, max_seq_len: int | None = None
) -> AttentionConfig:
    """The untuned tile shape (chosen from sweeps on an H100, see docs/results/2026-11-25-h100/README.md).
    `max_seq_len`: the step's longest context (None: any length).

    Decode over an fp8 cache is bound by instructions and latency, not by memory, and its best tile
    depends on the context (docs/results/2026-12-06-h100/README.md). Over long contexts, five stages:
    that is what makes Triton double-buffer the K/V tiles behind the block-table load. Over contexts of
    at most SHORT_FP8_DECODE_KEYS, where a program sees a few tiles only, a small tile (32 keys, two warps,
    two stages) that keeps more programs on each SM. A 16-bit cache streams at the memory's rate with
    one tile at every length, and keeps two stages."""
    if decode:
        if fp8_cache and head_dim_p2 <= 128:
            if max_seq_len is not None and max_seq_len <= SHORT_FP8_DECODE_KEYS:
                return AttentionConfig(block_m=16, block_n=32, num_warps=2, num_stages=2)
            return AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=5)
        return AttentionConfig(
            block_m=16, block_n=64 if head_dim_p2 <= 128 else 32, num_warps=4, num_stages=2
        )
    if head_dim_p2 <= 128:
        return AttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)


def decode_context_bounds(head_dim_p2: int, *, fp8_cache: bool) -> tuple[int, ...]:
    """The longest-context bounds, ascending, at which `default_config`'s decode tile changes: a CUDA
    graph captured for contexts up to a bound runs the tile of that bound (none: one tile serves every
    length, or a tuned tile is installed)."""
    if tuned_config(True, head_dim_p2) is not None:
        return ()
    short = builtin_config(True, head_dim_p2, fp8_cache=fp8_cache, max_seq_len=SHORT_FP8_DECODE_KEYS)
    return (SHORT_FP8_DECODE_KEYS,) if short != builtin_config(True, head_dim_p2, fp8_cache=fp8_cache) else ()


def choose_num_splits(num_tiles: int, num_kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """How many sequence slices to cut each tile's keys into.

    Split only when the tiles alone leave the GPU under-filled (fewer than two programs per SM),
    into enough slices to fill it, each of at least 64 keys, at most 32 slices, rounded down to a
    power of two: the count is a compile-time constant of the kernel, so each distinct value is a
    compile, and a load whose batch shape drifts would otherwise meet new ones for a long time. (On an H100,
    Llama-3.1-8B heads, batch 1: 4096 keys take 123 us unsplit, 21 us in 32 slices; 512 keys take
    23 us unsplit, 13 us in 8; at batch 64 splitting only costs, see docs/results/2026-11-25-h100/README.md.)
    """
    programs = num_tiles * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, max(programs, 1))
    by_length = max_kv_len // 64
    return 1 << (int(max(1, min(wanted, by_length, 32))).bit_length() - 1)


def split_counters(device: torch.device, size: int) -> torch.Tensor:
    """A zeroed int32 workspace of at least `size` counters on `device` (see the module docstring)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < size:
        if counters is not None:
            _RETIRED_COUNTERS.append(counters)
        counters = torch.zeros(max(size, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters
