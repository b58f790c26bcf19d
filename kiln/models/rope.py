"""Rotary position embeddings (RoPE) for Llama: inverse frequencies and the cos/sin table kernels read.

Supported `rope_scaling` types are the ones Llama checkpoints use with a fixed table: plain RoPE
(None / "default"), "linear" (position interpolation) and "llama3" (Llama-3.1's frequency-dependent
scaling). The frequencies follow transformers' `ROPE_INIT_FUNCTIONS` exactly (the tests compare them),
so logits match Hugging Face. "dynamic" NTK scaling changes the table with the sequence length, and
"yarn"/"longrope" rescale attention too; they are refused with a CheckpointError rather than run wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(config: ModelConfig) -> str:
    """The config's RoPE variant ("default" when there is no scaling)."""
    scaling = config.rope_scaling or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies on the CPU, after the config's scaling."""
    scaling: dict[str, Any] = dict(config.rope_scaling or {})
    kind = rope_type(config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"rope_scaling type {kind!r} is not supported by Kiln (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    dim = config.head_dim
    if dim % 2:
        raise CheckpointError(f"RoPE needs an even head_dim, got {dim}")
    # int64 arange then float, as transformers does, so the exponents round identically.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if kind == "linear":
        return inv_freq / float(_required(scaling, "factor", kind))
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, those between blended.

    The blend weight is linear in (original context / wavelength) between low_freq_factor and
    high_freq_factor, which keeps the frequency curve continuous at both edges.
    """
    factor = float(_required(scaling, "factor", "llama3"))
    low_freq_factor = float(_required(scaling, "low_freq_factor", "llama3"))
    high_freq_factor = float(_required(scaling, "high_freq_factor", "llama3"))
    original_context = float(_required(scaling, "original_max_position_embeddings", "llama3"))
    longest_kept_wavelen = original_context / high_freq_factor
    shortest_scaled_wavelen = original_context / low_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > shortest_scaled_wavelen, inv_freq / factor, inv_freq)
    blend = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_between = (wavelen >= longest_kept_wavelen) & (wavelen <= shortest_scaled_wavelen)
    return torch.where(in_between, blended, scaled)


def _required(scaling: dict[str, Any], key: str, kind: str) -> Any:
    if key not in scaling:
        raise CheckpointError(f"rope_scaling of type {kind!r} needs {key!r}; got {sorted(scaling)}")
    return scaling[key]


def build_cos_sin_cache(
    config: ModelConfig,
    max_positions: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[max_positions, head_dim] table; row p is [cos(p * inv_freq) | sin(p * inv_freq)].

    This is the layout `kernels.apply_rotary` reads (Hugging Face's rotate_half / NeoX convention:
    dimension i and i + head_dim/2 rotate together). Computed in float32 on the CPU (as transformers
    does) and then moved, so the table is the same on every device; an explicit CPU device keeps
    it real even inside a `torch.device("meta")` context.
    """
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    inv_freq = rope_inv_freq(config)
    positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, inv_freq)
    table = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return table.to(device=device, dtype=dtype)
