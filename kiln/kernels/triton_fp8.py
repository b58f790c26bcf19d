"""Widening float8 E4M3 to 16 bits inside a Triton kernel, on every GPU with FP8 (Ada and Hopper).

An e4m3 value is exact in float16, bfloat16 and float32, so widening never rounds; how it is done depends on
the GPU. Triton 3.6 converts e4m3 to bfloat16 through float16 with a `cvt.bf16.f16` instruction that only
sm_90 (Hopper) has: on Ada (sm_89) such a kernel fails in ptxas (tests/gpu/test_kernels_compile.py compiles
both targets). There the tile goes through float32 instead (e4m3 -> float16 -> float32 -> bfloat16, each
exact). `fp8_via_float32` says where that is needed; `widen` is how kernels widen e4m3 tiles to a dtype that
may be bfloat16. Widening to float16 is one conversion on both (paged attention's products are float16).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

HOPPER = (9, 0)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)  # type: ignore[return-value]


def is_hopper(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9.0 or later."""
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= HOPPER


def fp8_via_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether e4m3 tiles widened to `dtype` on `device` go through float32 (bfloat16 before Hopper)."""
    return dtype == torch.bfloat16 and device.type == "cuda" and not is_hopper(device)


@triton.jit
def widen(t, DTYPE: tl.constexpr, VIA_F32: tl.constexpr):
    """t in DTYPE; through float32 first when VIA_F32 (a no-op conversion when t already is DTYPE)."""
    return t.to(tl.float32).to(DTYPE) if VIA_F32 else t.to(DTYPE)
