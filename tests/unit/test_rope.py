"""RoPE frequencies and cos/sin tables against transformers' own RoPE initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.models.rope import build_cos_sin_cache, rope_inv_freq

LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _configs(rope_scaling: dict | None, head_dim: int = 128, theta: float = 500000.0):
    hf = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_theta=theta,
        rope_scaling=rope_scaling,
    )
    return hf, ModelConfig.from_hf(hf.to_dict())


@pytest.mark.parametrize(
    "scaling",
    [None, LLAMA31_SCALING, {"rope_type": "linear", "factor": 4.0}],
    ids=["default", "llama3", "linear"],
)
def test_inv_freq_matches_transformers(scaling: dict | None) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, config = _configs(scaling)
    if scaling is None:
        want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
        assert attention_factor == 1.0  # Kiln's tables carry no extra scaling for these types
    assert torch.equal(rope_inv_freq(config), want)


def test_llama3_scaling_keeps_short_blends_middle_and_slows_long_wavelengths() -> None:
    _, plain = _configs(None)
    _, scaled = _configs(LLAMA31_SCALING)
    base, got = rope_inv_freq(plain), rope_inv_freq(scaled)
    wavelen = 2 * torch.pi / base
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(got[short], base[short])
    torch.testing.assert_close(got[long], base[long] / 8.0)
    middle = ~short & ~long
    assert ((got[middle] < base[middle]) & (got[middle] > base[middle] / 8.0)).all()


@pytest.mark.parametrize("scaling", [None, LLAMA31_SCALING], ids=["default", "llama3"])
def test_cos_sin_table_matches_hf_rotary_embedding(scaling: dict | None) -> None:
    hf, config = _configs(scaling, head_dim=64)
    positions = torch.tensor([0, 1, 17, 4095, 9000, 70000])
    table = build_cos_sin_cache(config, max_positions=70001, device="cpu")
    assert table.shape == (70001, 64) and table.dtype == torch.float32
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions[None])
    half = config.head_dim // 2
    torch.testing.assert_close(table[positions, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[positions, half:], sin[0, :, :half], atol=1e-6, rtol=0)


def test_table_is_real_inside_a_meta_device_context() -> None:
    _, config = _configs(None, head_dim=8)
    with torch.device("meta"):
        table = build_cos_sin_cache(config, max_positions=4)
    assert not table.is_meta
    assert table[0].tolist() == [1.0] * 4 + [0.0] * 4


@pytest.mark.parametrize(
    "scaling,message",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "yarn"),
        ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ],
)
def test_unsupported_or_incomplete_scaling_is_refused(scaling: dict, message: str) -> None:
    config = ModelConfig(
        vocab_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=64,
        rope_scaling=scaling,
    )
    with pytest.raises(CheckpointError, match=message):
        build_cos_sin_cache(config, 16)
