"""Packing Hugging Face Llama tensors into Kiln's fused layout, and the shapes that layout must have.

Kiln's model fuses two groups of projections so each runs as one matmul:
  - `model.layers.N.self_attn.qkv_proj.{weight,bias}` = rows [q_proj; k_proj; v_proj]
  - `model.layers.N.mlp.gate_up_proj.{weight,bias}`   = rows [gate_proj; up_proj]
Every other tensor keeps its Hugging Face name. `lm_head.weight` is dropped when the embeddings
are tied (the model reuses `model.embed_tokens.weight`), and `rotary_emb.inv_freq` buffers that old
checkpoints carry are ignored (Kiln recomputes RoPE from the config).

A quantized native engine (kiln.config.QuantConfig) stores each quantized linear's `...weight` in the
scheme's dtype (int8 or float8_e4m3fn) with a float32 `...weight_scale` beside it (and, for int8_sq's
o_proj and down_proj, a float32 `...smooth_scale` [K]: `smooth_name`). An engine with an fp8 KV cache
(kiln.config.KVCacheConfig) also stores each layer's float32 [1] `model.layers.N.self_attn.k_scale` and
`v_scale` (`kv_scale_names`). The expected shapes and the fixed dtypes are
`expected_packed_shapes(config, quant, kv_cache)` and `expected_packed_dtypes`.

`pack_hf_state_dict` streams: it holds back only the parts of a fused group until the group is
complete, so packing a 7B checkpoint shard by shard never holds two copies of the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from kiln.config import QUANTIZED_LINEARS, KVCacheConfig, ModelConfig, QuantConfig
from kiln.errors import CheckpointError

# Fused tensor suffix -> the HF suffixes whose rows it concatenates, in order.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# HF module suffix -> (fused module suffix, index of its rows within the group).
_PART_OF: dict[str, tuple[str, int]] = {
    part: (fused, index) for fused, parts in FUSED_GROUPS.items() for index, part in enumerate(parts)
}
# weight_scale: a pre-quantized checkpoint's scales (kiln.build.prequantized), fused like their weights.
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias|weight_scale)$")


def quantized_weight_names(config: ModelConfig, quant: QuantConfig | None) -> list[str]:
    """The packed `...weight` names stored quantized under `quant` (none without it), in layer order."""
    if quant is None:
        return []
    return [
        f"model.layers.{layer}.{linear}.weight"
        for layer in range(config.num_hidden_layers)
        for linear in QUANTIZED_LINEARS
        if linear in quant.linears
    ]


def kv_scale_names(config: ModelConfig, kv_cache: KVCacheConfig | None) -> list[str]:
    """The fp8 KV cache's scale tensors, k then v of each layer in order (none without `kv_cache`)."""
    if kv_cache is None:
        return []
    return [
        f"model.layers.{layer}.self_attn.{kind}_scale"
        for layer in range(config.num_hidden_layers)
        for kind in ("k", "v")
    ]


def scale_name(weight_name: str) -> str:
    """`...qkv_proj.weight` -> `...qkv_proj.weight_scale`: where a quantized weight's scales are stored."""
    return weight_name + "_scale"


def smooth_name(weight_name: str) -> str:
    """`...o_proj.weight` -> `...o_proj.smooth_scale`: an int8_sq layer's explicit smoothing factors."""
    return weight_name.removesuffix("weight") + "smooth_scale"


def explicitly_smoothed_names(config: ModelConfig, quant: QuantConfig | None) -> list[str]:
    """The quantized `...weight` names that store a `smooth_name` tensor (int8_sq's SMOOTH_EXPLICIT)."""
    names = quantized_weight_names(config, quant)
    return [
        n
        for n in names
        if quant is not None and quant.explicit_smoothing(n.split(".", 3)[3][: -len(".weight")])
    ]


def expected_packed_dtypes(
    config: ModelConfig, quant: QuantConfig | None, kv_cache: KVCacheConfig | None = None
) -> dict[str, str]:
    """The tensors whose dtype the layout fixes, name -> torch dtype name: each quantized weight
    (int8 or float8_e4m3fn) and its float32 scale, and an fp8 KV cache's float32 k_scale / v_scale.
    Every other tensor is in the engine's dtype."""
    dtypes: dict[str, str] = dict.fromkeys(kv_scale_names(config, kv_cache), "float32")
    for name in quantized_weight_names(config, quant):
        assert quant is not None
        dtypes[name] = quant.weight_dtype
        dtypes[scale_name(name)] = "float32"
    for name in explicitly_smoothed_names(config, quant):
        dtypes[smooth_name(name)] = "float32"
    return dtypes


def expected_packed_shapes(
    config: ModelConfig, quant: QuantConfig | None = None, kv_cache: KVCacheConfig | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor a packed Kiln checkpoint holds for `config`, name -> shape (and nothing else).

    With `quant`, each quantized weight keeps its [N, K] shape and gains `scale_name(weight)`: [N] per
    channel, [N, K // group_size] per group (kiln.config.QuantConfig). With `kv_cache` (fp8), each layer
    has its `kv_scale_names`, [1] each."""
    shapes = _unquantized_shapes(config)
    shapes.update(dict.fromkeys(kv_scale_names(config, kv_cache), (1,)))
    for name in quantized_weight_names(config, quant):
        assert quant is not None
        rows, cols = shapes[name]
        shapes[scale_name(name)] = (rows,) if quant.group_size is None else (rows, cols // quant.group_size)
    for name in explicitly_smoothed_names(config, quant):
        shapes[smooth_name(name)] = (shapes[name][1],)
    return shapes


def _unquantized_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    qkv_rows = config.q_size + 2 * config.kv_size
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "self_attn.qkv_proj.weight"] = (qkv_rows, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, config.q_size)
        if config.attention_bias:
            shapes[prefix + "self_attn.qkv_proj.bias"] = (qkv_rows,)
            shapes[prefix + "self_attn.o_proj.bias"] = (hidden,)
        shapes[prefix + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, inter)
        if config.mlp_bias:
            shapes[prefix + "mlp.gate_up_proj.bias"] = (2 * inter,)
            shapes[prefix + "mlp.down_proj.bias"] = (hidden,)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def pack_hf_state_dict(
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (packed name, tensor) for Hugging Face Llama tensors, in any input order.

    Rules: a fused tensor is yielded as soon as all its parts have arrived (parts are then
    released); unfused tensors pass through unchanged (same object, same dtype). Raises
    CheckpointError for a tensor name Kiln does not know, a layer index beyond the config, a
    duplicate, or a fused group still incomplete when the input ends. Shapes are checked by
    the consumer against `expected_packed_shapes` (`LlamaForCausalLM.load_weights` does).
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    pending: dict[str, dict[int, torch.Tensor]] = {}  # packed name -> {part index: tensor}
    seen: set[str] = set()
    for name, tensor in items:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some checkpoints saved; RoPE comes from the config
        if name in seen:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint")
        seen.add(name)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the model reads model.embed_tokens.weight
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            yield name, tensor
            continue
        match = _LAYER_NAME.match(name)
        if match is None:
            raise CheckpointError(f"unexpected tensor {name!r}: not part of a Llama checkpoint")
        layer, module, kind = int(match[1]), match[2], match[3]
        if layer >= config.num_hidden_layers:
            raise CheckpointError(
                f"unexpected tensor {name!r}: the config has {config.num_hidden_layers} layers"
            )
        if module in _PART_OF:
            fused, index = _PART_OF[module]
            packed_name = f"model.layers.{layer}.{fused}.{kind}"
            parts = pending.setdefault(packed_name, {})
            parts[index] = tensor
            if len(parts) == len(FUSED_GROUPS[fused]):
                del pending[packed_name]
                yield packed_name, _concat_rows(packed_name, [parts[i] for i in range(len(parts))])
            continue
        if module in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            yield name, tensor
            continue
        raise CheckpointError(f"unexpected tensor {name!r}: not part of a Llama checkpoint")
    if pending:
        incomplete = {
            packed: [
                _hf_part_name(packed, i)
                for i in range(len(FUSED_GROUPS[_fused_of(packed)]))
                if i not in parts
            ]
            for packed, parts in pending.items()
        }
        raise CheckpointError(f"checkpoint is missing tensors of fused projections: {incomplete}")


def _concat_rows(packed_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise CheckpointError(f"parts of {packed_name!r} have different dtypes {sorted(map(str, dtypes))}")
    trailing = {tuple(p.shape[1:]) for p in parts}
    if len(trailing) != 1:
        raise CheckpointError(
            f"parts of {packed_name!r} cannot be stacked: shapes {[tuple(p.shape) for p in parts]}"
        )
    return torch.cat(parts, dim=0)


def _fused_of(packed_name: str) -> str:
    return next(fused for fused in FUSED_GROUPS if f".{fused}." in packed_name)


def _hf_part_name(packed_name: str, index: int) -> str:
    fused = _fused_of(packed_name)
    return packed_name.replace(fused, FUSED_GROUPS[fused][index])
