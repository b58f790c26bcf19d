"""Pre-quantized FP8 checkpoints in NVIDIA ModelOpt's Hugging Face layout (what `modelopt` exports and NVIDIA
publishes as `...-FP8` models).

Such a checkpoint says how it is quantized in `hf_quant_config.json`
(`{"producer": {"name": "modelopt", ...}, "quantization": {"quant_algo": ..., "kv_cache_quant_algo": ...,
"exclude_modules": [...]}}`) or, in newer exports, in config.json's `quantization_config` with
`"quant_method": "modelopt"` (the same keys at its top level, or under `quantization`). Each quantized linear
stores `<name>.weight` (float8_e4m3fn [out, in]), `<name>.weight_scale` and, for static activations,
`<name>.input_scale`: the tensor names of the compressed-tensors layout, so `kiln.build.prequantized` packs
both the same way.

Rules (`modelopt_fp8`; anything else is a CheckpointError naming it):
- `quant_algo` `FP8` (a per-tensor weight scale and a static per-tensor input scale) or
  `FP8_PER_CHANNEL_PER_TOKEN` (per-channel weight scales, activations dynamic per token). Other algorithms
  (NVFP4, W4A16 / INT4-AWQ, MXFP8, block-wise FP8, mixed precision) are refused by name.
- `exclude_modules` may leave lm_head in 16 bits (any pattern matching `lm_head` alone) but no decoder linear.
- `kv_cache_quant_algo` `FP8`: the checkpoint's K/V scales (`...k_proj.k_scale`, `...v_proj.v_scale`) become
  the engine's fp8 KV cache scales when it is built with `--kv-cache-dtype fp8` (no calibration runs; they are
  used as vLLM uses them, for the cache's K after the rotary embedding); without the flag they are checked
  and dropped, and engine.json says which. Any other KV algorithm is refused.
- As for compressed-tensors, static input scales are dropped: Kiln quantizes activations per token at run
  time, and the record says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from kiln.errors import CheckpointError

CONFIG_NAME = "hf_quant_config.json"
ALGOS = {"FP8": ("tensor", True), "FP8_PER_CHANNEL_PER_TOKEN": ("channel", False)}  # -> (weights, static)
KV_SCALES_NOTE = (
    "FP8 k/v scales dropped: the engine's KV cache is its dtype; build with --kv-cache-dtype fp8 to use them"
)
# One name per kind of decoder linear: an exclude pattern matching any of them leaves it unquantized.
_DECODER_LINEARS = [
    f"model.layers.0.{module}"
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


@dataclass(frozen=True, slots=True)
class ModelOptFP8:
    """What a supported ModelOpt FP8 checkpoint holds (see the module rules)."""

    quant_algo: str
    weight_strategy: str  # "tensor" | "channel"
    static_input_scales: bool
    kv_scales: bool  # the checkpoint carries FP8 k/v scales (dropped by the build)


def is_modelopt(checkpoint_dir: Path, hf: dict[str, Any]) -> bool:
    """Whether the checkpoint says it is ModelOpt's (its hf_quant_config.json, or config.json's quant_method)."""
    qc = hf.get("quantization_config")
    method = str(qc.get("quant_method", "")) if isinstance(qc, dict) else ""
    return (Path(checkpoint_dir) / CONFIG_NAME).is_file() or method.lower().startswith("modelopt")


def modelopt_fp8(checkpoint_dir: Path, hf: dict[str, Any]) -> ModelOptFP8:
    """The checkpoint's ModelOpt FP8 layout; CheckpointError naming what Kiln does not build (module rules)."""
    path = Path(checkpoint_dir) / CONFIG_NAME
    if path.is_file():
        where = str(path)
        try:
            quant = json.loads(path.read_text(encoding="utf-8")).get("quantization")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: not a ModelOpt quantization config ({exc})") from exc
    else:
        where = f"{checkpoint_dir}/config.json quantization_config"
        qc = hf["quantization_config"]
        quant = qc.get("quantization", qc)
    if not isinstance(quant, dict):
        raise CheckpointError(f"{where}: no 'quantization' object")
    algo = str(quant.get("quant_algo") or "").upper()
    if algo not in ALGOS:
        raise CheckpointError(
            f"{where}: ModelOpt quant_algo {quant.get('quant_algo')!r} is not supported; Kiln builds "
            f"{' and '.join(ALGOS)} (FP8 weights) only"
        )
    kv = quant.get("kv_cache_quant_algo")
    if isinstance(quant.get("kv_cache_scheme"), dict):  # the compressed-tensors-style spelling
        scheme = quant["kv_cache_scheme"]
        kv = "FP8" if (scheme.get("type"), scheme.get("num_bits")) == ("float", 8) else str(scheme)
    if kv is not None and str(kv).upper() != "FP8":
        raise CheckpointError(f"{where}: kv_cache_quant_algo {kv!r} is not supported (only FP8 or none)")
    excluded = list(quant.get("exclude_modules", quant.get("ignore")) or [])
    for pattern in excluded:
        if any(fnmatch(name, pattern) or pattern in name for name in _DECODER_LINEARS):
            raise CheckpointError(
                f"{where}: exclude_modules {excluded} leaves some decoder linears unquantized; Kiln needs every "
                "decoder linear quantized (lm_head may stay in 16 bits)"
            )
    strategy, static = ALGOS[algo]
    return ModelOptFP8(algo, strategy, static, kv is not None)
