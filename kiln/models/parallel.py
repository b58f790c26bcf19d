"""Tensor parallelism's model side: which slice of each packed weight a rank owns, and the collectives.

Megatron-style sharding over `world` ranks:
- column-parallel (output rows split): the fused `qkv_proj` (q, k and v sliced separately, by heads) and
  `gate_up_proj` (gate and up sliced separately), so each rank's fused matmul yields its own heads and
  its own slice of the MLP;
- row-parallel (input columns split): `o_proj` and `down_proj`; each rank's output is a partial sum,
  all-reduced. Their bias is added once: rank 0 holds it, the other ranks hold zeros;
- vocab-parallel: `embed_tokens` and `lm_head` in contiguous row slices of `ceil(vocab / world)` rows,
  the last padded with zero rows. The embedding is a masked lookup + all-reduce, the logits an
  all-gather trimmed back to the vocabulary;
- KV heads: with at least `world` of them each rank owns `num_kv_heads / world`; with fewer, each head is
  replicated on `world / num_kv_heads` ranks (a rank's query heads all read that one KV head);
- norms are replicated.

A rank's model is an ordinary `LlamaForCausalLM` built from `shard_config` (its heads, its MLP width, its
vocabulary slice), so shapes, the KV cache and the memory profile need no other change. World size 1
never builds a `TensorParallelGroup`: the model then runs the single-process code path, no collective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.config import ModelConfig

__all__ = [
    "ShardSpec",
    "TensorParallelGroup",
    "check_tensor_parallel",
    "kv_head_range",
    "read_shard",
    "shard_config",
    "shard_spec",
    "vocab_shard_size",
]


def check_tensor_parallel(config: ModelConfig, world: int) -> None:
    """Raise ValueError unless `config` shards over `world` ranks: query heads and the MLP width divisible
    by `world`; KV heads divisible by `world`, or `world` divisible by them (replicated). Why: every rank
    must run the same shapes, and a query head's KV head must live on its rank."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world}")
    heads, kv_heads, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    problems = []
    if heads % world:
        problems.append(f"num_attention_heads {heads} is not divisible by it")
    if inter % world:
        problems.append(f"intermediate_size {inter} is not divisible by it")
    if kv_heads >= world and kv_heads % world:
        problems.append(f"num_key_value_heads {kv_heads} is not divisible by it")
    if kv_heads < world and world % kv_heads:
        problems.append(f"it is not a multiple of num_key_value_heads {kv_heads} (to replicate them)")
    if problems:
        raise ValueError(f"tensor_parallel_size {world} does not fit this model: " + "; ".join(problems))


def vocab_shard_size(vocab_size: int, world: int) -> int:
    """Rows of the embedding (and head) each rank holds: the vocabulary padded to a multiple of world."""
    return -(-vocab_size // world)


def kv_head_range(config: ModelConfig, rank: int, world: int) -> tuple[int, int]:
    """The KV heads [start, stop) rank `rank` holds: its share, or the one head its query heads read."""
    kv_heads = config.num_key_value_heads
    if kv_heads >= world:
        per_rank = kv_heads // world
        return rank * per_rank, (rank + 1) * per_rank
    head = rank // (world // kv_heads)
    return head, head + 1


def shard_config(config: ModelConfig, world: int) -> ModelConfig:
    """The model one rank builds: its query heads, KV heads, MLP width and vocabulary slice."""
    if world == 1:
        return config
    check_tensor_parallel(config, world)
    start, stop = kv_head_range(config, 0, world)
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // world,
        num_key_value_heads=stop - start,
        intermediate_size=config.intermediate_size // world,
        vocab_size=vocab_shard_size(config.vocab_size, world),
    )


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One rank's part of a packed tensor: the ranges [start, stop) of axis `dim`, concatenated in order,
    then padded with zero rows to `pad_to` rows (the vocabulary); `zeros`: a row-parallel bias off rank 0."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    pad_to: int | None = None
    zeros: bool = False


def shard_spec(name: str, config: ModelConfig, rank: int, world: int) -> ShardSpec | None:
    """What rank `rank` of `world` holds of the packed tensor `name` (kiln.models.weights); None: all of it."""
    if world == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = vocab_shard_size(config.vocab_size, world)
        start = min(rank * rows, config.vocab_size)
        return ShardSpec(0, ((start, min(start + rows, config.vocab_size)),), pad_to=rows)
    module = name.rsplit(".", 1)[0]
    is_bias = name.endswith(".bias")
    d = config.head_dim
    if module.endswith("self_attn.qkv_proj"):
        q_rows = config.q_size // world
        kv_start, kv_stop = kv_head_range(config, rank, world)
        k_base, v_base = config.q_size, config.q_size + config.kv_size
        return ShardSpec(
            0,
            (
                (rank * q_rows, (rank + 1) * q_rows),
                (k_base + kv_start * d, k_base + kv_stop * d),
                (v_base + kv_start * d, v_base + kv_stop * d),
            ),
        )
    if module.endswith("mlp.gate_up_proj"):
        inter, rows = config.intermediate_size, config.intermediate_size // world
        return ShardSpec(
            0, ((rank * rows, (rank + 1) * rows), (inter + rank * rows, inter + (rank + 1) * rows))
        )
    if module.endswith(("self_attn.o_proj", "mlp.down_proj")):
        if is_bias:  # the all-reduce sums the ranks' outputs: the bias is added by rank 0 alone
            return None if rank == 0 else ShardSpec(0, (), zeros=True)
        cols = (config.q_size if module.endswith("o_proj") else config.intermediate_size) // world
        return ShardSpec(1, ((rank * cols, (rank + 1) * cols),))
    return None  # norms: replicated


def read_shard(
    spec: ShardSpec | None, shape: tuple[int, ...], get: Callable[[tuple[slice, ...]], torch.Tensor]
) -> torch.Tensor:
    """Read one rank's shard of a tensor of `shape` through `get(index)` (a tensor's `__getitem__`, or a
    safetensors slice's, which reads only those bytes from the file: a 70B weight never loads whole)."""
    if spec is None:
        return get(tuple(slice(None) for _ in shape))
    if spec.zeros:
        return torch.zeros(shape, dtype=get((slice(0, 0),) * len(shape)).dtype)
    parts = []
    for start, stop in spec.ranges:
        index = [slice(None)] * len(shape)
        index[spec.dim] = slice(start, stop)
        parts.append(get(tuple(index)))
    tensor = torch.cat(parts, dim=spec.dim) if len(parts) > 1 else parts[0]
    if spec.pad_to is not None and tensor.shape[spec.dim] < spec.pad_to:
        pad_shape = list(tensor.shape)
        pad_shape[spec.dim] = spec.pad_to - tensor.shape[spec.dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=spec.dim)
    return tensor


@dataclass(slots=True)
class TensorParallelGroup:
    """This process's rank in a tensor-parallel group and its collectives. `group` is a torch.distributed
    process group object (gloo on the CPU, NCCL on CUDA); `vocab_size` is the model's whole vocabulary."""

    rank: int
    world: int
    group: Any
    vocab_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the row-parallel layers' partial outputs)."""
        self.group.allreduce([x]).wait()
        return x

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: each rank looks up the ids in its slice (zeros elsewhere), summed."""
        rows = weight.shape[0]
        local = input_ids - self.rank * rows
        outside = (local < 0) | (local >= rows)
        hidden = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight)
        return self.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slice of the logits, side by side and trimmed to the vocabulary."""
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        self.group.allgather([parts], [logits]).wait()
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """`x` from rank 0 on every rank, in place."""
        self.group.broadcast(x, 0).wait()
        return x
