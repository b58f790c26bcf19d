"""An engine directory's weight files: packed, converted or quantized tensors streamed into shards.

Rules:
- One file, `model.safetensors`, when everything fits in `max_shard_bytes`; otherwise HF-style shards
  `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (tensor name -> file).
- A quantized weight's scale (and SmoothQuant's explicit smoothing factors) goes into the same shard
  as the weight, so a shard is loadable on its own.
- Shards are written under hidden names and renamed once all are complete, inside the build's
  staging directory (kiln.build.native), which is itself renamed into place last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kiln.build.prequantized import PreQuantizedFP8, pack_prequantized
from kiln.config import ModelConfig, QuantConfig
from kiln.errors import CheckpointError
from kiln.kernels.quant_reference import quantize_fp8, quantize_int8
from kiln.models.weight_files import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from kiln.models.weights import (
    expected_packed_shapes,
    pack_hf_state_dict,
    quantized_weight_names,
    scale_name,
    smooth_name,
)

MAX_SHARD_BYTES = 2 * 1024**3


def drain(tensors: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield and forget each tensor, so the dict does not keep packed-away tensors alive."""
    while tensors:
        name = next(iter(tensors))
        yield name, tensors.pop(name)


def write_packed_weights(
    tensors: Iterable[tuple[str, Any]],
    model: ModelConfig,
    out: Path,
    dtype: Any,
    max_shard_bytes: int,
    quant: QuantConfig | None = None,
    *,
    packed: bool = False,
    smooth_scales: dict[str, Any] | None = None,
    prequantized: PreQuantizedFP8 | None = None,
    kv_scales: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Pack, convert (or quantize) and write the weights in shards; returns {file name: size} written.

    Checks the packed tensors against `expected_packed_shapes` so a checkpoint that does not fit its
    own config fails here, at build time, not when the engine loads. A quantized weight is quantized
    from the checkpoint's own values (not from their `dtype` rounding) and its scale goes into the
    same shard. packed: the tensors already have packed names (int8_sq's smoothed float32 model);
    smooth_scales: {weight name: s} stored beside those weights as `smooth_name(weight)`. prequantized:
    the checkpoint's linears are already e4m3 (`pack_prequantized` yields each as (q, scale)), stored as given;
    its FP8 k/v scales, if any, go into `kv_scales` when given (the fp8 KV cache's, written after).
    """
    from safetensors.torch import save_file

    expected = expected_packed_shapes(model)
    quantized = set(quantized_weight_names(model, quant))
    shard: dict[str, Any] = {}
    shard_bytes = 0
    shard_files: list[Path] = []
    weight_map: dict[str, int] = {}  # tensor name -> shard number

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = out / f".shard-{len(shard_files):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        shard_files.append(path)
        shard, shard_bytes = {}, 0

    if packed:
        stream: Iterable[tuple[str, Any]] = tensors
    elif prequantized is not None:
        stream = pack_prequantized(tensors, model, prequantized, kv_scales)
    else:
        stream = pack_hf_state_dict(tensors, model)
    for name, item in stream:
        given = item if isinstance(item, tuple) else None  # a pre-quantized (q, scale)
        tensor = item[0] if given is not None else item
        want = expected.pop(name, None)
        if want is None:
            raise CheckpointError(f"tensor {name!r} does not belong to this model's config")
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {want}"
            )
        if given is not None and name not in quantized:
            raise CheckpointError(f"{name!r} is quantized in the checkpoint but not a layer Kiln quantizes")
        if name in quantized:
            assert quant is not None
            if given is not None:
                q, scale = given
            elif prequantized is not None:
                raise CheckpointError(f"{name!r} is not quantized in this pre-quantized checkpoint")
            elif quant.scheme == "fp8":
                q, scale = quantize_fp8(tensor)
            else:
                q, scale = quantize_int8(tensor, quant.group_size)
            stored = {name: q.contiguous(), scale_name(name): scale.contiguous()}
            if smooth_scales and name in smooth_scales:
                stored[smooth_name(name)] = smooth_scales[name].float().contiguous()
        else:
            stored = {name: tensor.to(dtype).contiguous()}
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        for stored_name, converted in stored.items():
            shard[stored_name] = converted
            weight_map[stored_name] = len(shard_files)
        shard_bytes += nbytes
    if expected:
        raise CheckpointError(f"checkpoint is missing tensors: {sorted(expected)[:8]}")
    if shard:
        flush()

    total = len(shard_files)
    names = (
        [WEIGHTS_NAME]
        if total == 1
        else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    )
    sizes: dict[str, int] = {}
    for path, name in zip(shard_files, names, strict=True):
        os.replace(path, out / name)
        sizes[name] = (out / name).stat().st_size
    if total > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {tensor: names[i] for tensor, i in sorted(weight_map.items())},
        }
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        sizes[WEIGHTS_INDEX_NAME] = (out / WEIGHTS_INDEX_NAME).stat().st_size
    return sizes
