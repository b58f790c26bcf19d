"""`prefill_graph_tokens`: how long a prompt alone may be to replay a CUDA graph, resolved per engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.config import EngineConfig, EngineLimits, ModelConfig
from kiln.kernels.long_prompts import LONG_PROMPT_TOKENS

MODEL = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=8192,
)
CUDA = torch.device("cuda")  # resolve only reads the device's type: no GPU needed


def resolved(config: EngineConfig, device: torch.device = CUDA, **limits: int) -> int:
    out = config.resolve(EngineLimits(**limits), MODEL, device, lambda *_: 4096)
    return out.prefill_graph_tokens


def test_the_default_is_512_tokens_cut_to_one_step_and_to_room_for_a_token() -> None:
    assert resolved(EngineConfig()) == 512
    assert resolved(EngineConfig(prefill_graph_tokens=4096)) == 2048  # the engine's max_num_tokens
    assert resolved(EngineConfig(prefill_graph_tokens=4096, max_num_batched_tokens=8192)) == 4096
    assert resolved(EngineConfig(prefill_graph_tokens=4096), max_num_tokens=8192, max_seq_len=1000) == 999


def test_no_prefill_graphs_without_cuda_graphs_or_when_asked_for_none() -> None:
    assert resolved(EngineConfig(prefill_graph_tokens=0)) == 0
    assert resolved(EngineConfig(enforce_eager=True)) == 0
    assert resolved(EngineConfig(), torch.device("cpu")) == 0
    assert resolved(EngineConfig(prefill_graph_tokens=0), torch.device("cpu")) == 0


def test_a_size_for_graphs_that_are_never_captured_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"prefill_graph_tokens 2048 .* \(enforce_eager is set\)"):
        resolved(EngineConfig(prefill_graph_tokens=2048, enforce_eager=True))
    with pytest.raises(ValueError, match=r"prefill_graph_tokens 1024 .* \(the engine runs on cpu\)"):
        resolved(EngineConfig(prefill_graph_tokens=1024), torch.device("cpu"))


def test_out_of_range_values_are_refused_by_name_and_the_cap_stays_below_cudnn_s_prompts() -> None:
    with pytest.raises(ValueError, match="prefill_graph_tokens must be >= 0, got -1"):
        EngineConfig(prefill_graph_tokens=-1)
    with pytest.raises(ValueError, match="prefill_graph_tokens must be <= 8191, got 8192"):
        EngineConfig(prefill_graph_tokens=8192)
    # A fresh prompt of LONG_PROMPT_TOKENS or more runs its attention in cuDNN, eagerly; a graph
    # captured for another prompt would replay the Triton kernel for it instead.
    field = {f.name: f for f in dataclasses.fields(EngineConfig)}["prefill_graph_tokens"]
    assert field.metadata["le"] == LONG_PROMPT_TOKENS - 1
