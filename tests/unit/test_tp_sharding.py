"""Tensor parallelism's sharding math (kiln.models.parallel): exact slices of every packed tensor, KV-head
replication, vocabulary padding, and the refusals for models that do not shard."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from kiln.config import EngineConfig, ModelConfig
from kiln.engine.tp_workers import tensor_parallel_size
from kiln.models.parallel import (
    ShardSpec,
    check_tensor_parallel,
    kv_head_range,
    read_shard,
    shard_config,
    shard_spec,
)
from kiln.models.weights import expected_packed_shapes

# 8 query heads of 4, 2 KV heads, MLP 24, vocabulary 10 (not a multiple of 4: padded).
CONFIG = ModelConfig(
    vocab_size=10,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=4,
    max_position_embeddings=64,
    attention_bias=True,
    mlp_bias=True,
)
QKV = "model.layers.0.self_attn.qkv_proj.weight"


def test_world_one_shards_nothing() -> None:
    assert shard_config(CONFIG, 1) is CONFIG
    assert all(shard_spec(name, CONFIG, 0, 1) is None for name in expected_packed_shapes(CONFIG))


def test_qkv_is_sliced_by_heads_q_k_and_v_separately() -> None:
    # q rows 0..31 (8 heads x 4), k rows 32..39 (2 heads), v rows 40..47.
    assert shard_spec(QKV, CONFIG, 1, 2) == ShardSpec(0, ((16, 32), (36, 40), (44, 48)))
    assert shard_spec(QKV.replace("weight", "bias"), CONFIG, 0, 2) == ShardSpec(
        0, ((0, 16), (32, 36), (40, 44))
    )


def test_kv_heads_are_replicated_when_fewer_than_ranks() -> None:
    # 4 ranks, 2 KV heads: ranks 0 and 1 read head 0, ranks 2 and 3 head 1.
    assert [kv_head_range(CONFIG, rank, 4) for rank in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert shard_spec(QKV, CONFIG, 3, 4) == ShardSpec(0, ((24, 32), (36, 40), (44, 48)))
    local = shard_config(CONFIG, 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (2, 1, 4)
    # Each rank's query heads all belong to the KV head it holds (group size 4 = 8 // 2).
    for rank in range(4):
        first_q = rank * local.num_attention_heads
        assert first_q // 4 == kv_head_range(CONFIG, rank, 4)[0]


def test_gate_up_o_and_down() -> None:
    layer = "model.layers.0."
    assert shard_spec(layer + "mlp.gate_up_proj.weight", CONFIG, 1, 2) == ShardSpec(0, ((12, 24), (36, 48)))
    assert shard_spec(layer + "self_attn.o_proj.weight", CONFIG, 1, 2) == ShardSpec(1, ((16, 32),))
    assert shard_spec(layer + "mlp.down_proj.weight", CONFIG, 0, 2) == ShardSpec(1, ((0, 12),))
    # Row-parallel biases are added once, by rank 0, after the all-reduce sums the partial outputs.
    for bias in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
        assert shard_spec(layer + bias, CONFIG, 0, 2) is None
        assert shard_spec(layer + bias, CONFIG, 1, 2) == ShardSpec(0, (), zeros=True)
    assert shard_spec(layer + "input_layernorm.weight", CONFIG, 1, 2) is None


def test_vocab_slices_are_contiguous_and_the_last_is_padded_with_zeros() -> None:
    table = torch.arange(10 * 32, dtype=torch.float32).view(10, 32)
    shards = [
        read_shard(shard_spec("lm_head.weight", CONFIG, r, 4), (10, 32), table.__getitem__) for r in range(4)
    ]
    assert [tuple(s.shape) for s in shards] == [(3, 32)] * 4
    whole = torch.cat(shards)
    assert torch.equal(whole[:10], table) and not whole[10:].any()


def test_every_rank_shard_has_the_shard_configs_shapes_and_they_rebuild_the_tensor() -> None:
    torch.manual_seed(0)
    for world in (2, 4):
        local = shard_config(CONFIG, world)
        want = expected_packed_shapes(local)
        for name, shape in expected_packed_shapes(CONFIG).items():
            full = torch.randn(shape)
            shards = [
                read_shard(shard_spec(name, CONFIG, r, world), shape, full.__getitem__) for r in range(world)
            ]
            assert all(tuple(s.shape) == want[name] for s in shards), name
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                assert torch.equal(torch.cat(shards, dim=1), full)
            elif name.endswith(("o_proj.bias", "down_proj.bias")):
                assert torch.equal(sum(shards), full)
            elif name == QKV and world == 2:
                q = torch.cat([s[:16] for s in shards])
                assert torch.equal(q, full[:32])


def test_models_that_do_not_shard_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="num_attention_heads 8 is not divisible"):
        check_tensor_parallel(CONFIG, 3)
    with pytest.raises(ValueError, match="intermediate_size 24 is not divisible"):
        check_tensor_parallel(CONFIG, 16)
    three_kv = dataclasses.replace(
        CONFIG, num_attention_heads=12, num_key_value_heads=3, intermediate_size=48
    )
    with pytest.raises(ValueError, match="multiple of num_key_value_heads 3"):
        check_tensor_parallel(three_kv, 4)
    six_kv = dataclasses.replace(CONFIG, num_attention_heads=12, num_key_value_heads=6, intermediate_size=48)
    with pytest.raises(ValueError, match="num_key_value_heads 6 is not divisible"):
        check_tensor_parallel(six_kv, 4)


def test_the_size_comes_from_the_knob_else_the_engine_dir() -> None:
    manifest = SimpleNamespace(extra={"tensor_parallel_size": 2})
    assert tensor_parallel_size(EngineConfig(), None) == 1
    assert tensor_parallel_size(EngineConfig(), manifest) == 2  # type: ignore[arg-type]
    assert tensor_parallel_size(EngineConfig(tensor_parallel_size=1), manifest) == 1  # type: ignore[arg-type]
