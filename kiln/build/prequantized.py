"""Pre-quantized FP8 Hugging Face checkpoints: the compressed-tensors layout llm-compressor writes, and
NVIDIA ModelOpt's (kiln.build.modelopt reads its config; its tensors are named as here).

Such a checkpoint's config.json has a `quantization_config` with `"quant_method": "compressed-tensors"`;
each quantized linear stores `<name>.weight` (float8_e4m3fn [out, in]), `<name>.weight_scale` (float32 or
bfloat16; [out, 1] or [out] per channel, [1] or a scalar per tensor) and, with static activations, a
`<name>.input_scale`. Kiln builds its native `fp8` engine from the stored e4m3 bytes directly.

Rules (`prequantized_fp8` checks them; anything else is a CheckpointError naming what is not supported):
- exactly one config group, `targets: ["Linear"]`, format `float-quantized` or `naive-quantized`;
- weights: `num_bits` 8, `type` float, symmetric, not dynamic, strategy `channel` or `tensor`;
- input activations: none, or 8-bit float dynamic per `token` (FP8-dynamic), or static per `tensor`.
  Kiln always quantizes activations per token at run time (at least as accurate as one static scale), so
  a static `input_scale` is read, checked and dropped, and engine.json says so;
- `ignore` is `[]` or `["lm_head"]` (or `"re:.*lm_head"`): every decoder linear quantized, lm_head left in 16 bits;
- no sparsity. A quantized KV cache (`kv_cache_scheme`: 8-bit float, static per tensor) brings one k and one v
  scale per layer (`self_attn.k_scale` / `v_scale`, or ModelOpt's `k_proj.k_scale` / `v_proj.v_scale`):
  with `--kv-cache-dtype fp8` they become the engine's fp8 KV cache scales (`pack_prequantized` hands them to
  the build), otherwise they are checked and dropped, and engine.json says which. Other quant methods (gptq, awq, bitsandbytes, fbgemm_fp8, ...) are
  refused by name; ModelOpt's FP8 layouts follow kiln.build.modelopt's rules.

Packing (`pack_prequantized`): each scale becomes float32 [out] (a per-tensor scale broadcast over its own
rows first), and q/k/v and gate/up are fused as weights and scales alike, rows in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.build.modelopt import KV_SCALES_NOTE, is_modelopt, modelopt_fp8
from kiln.config import DTYPE_ALIASES, DTYPE_NAMES, ModelConfig, QuantConfig
from kiln.errors import CheckpointError
from kiln.models.weights import FUSED_GROUPS, pack_hf_state_dict, scale_name

SOURCE = "pre-quantized (compressed-tensors)"
MODELOPT_SOURCE = "pre-quantized (NVIDIA ModelOpt)"
KV_SCALES_USED = "FP8 k/v scales used as the fp8 KV cache's (--kv-cache-dtype fp8)"
FORMATS = ("float-quantized", "naive-quantized")
STATIC_NOTE = "static per-tensor input_scale dropped: Kiln quantizes activations per token at run time"
LM_HEAD_IGNORES = ("lm_head", "re:.*lm_head")  # how llm-compressor spells "leave lm_head unquantized"
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class PreQuantizedFP8:
    """What a supported compressed-tensors FP8 checkpoint holds (see the module rules)."""

    weight_strategy: str  # "channel" | "tensor"
    static_input_scales: bool  # True: per-tensor input_scale tensors, dropped by the build
    format: str  # compressed-tensors' format, or ModelOpt's quant_algo
    dtype: str  # the checkpoint's dtype for its unquantized tensors (config.json's torch_dtype)
    source: str = SOURCE
    kv_scales: bool = False  # FP8 k/v scales in the checkpoint: the fp8 KV cache's, or dropped

    def record(self, kv_cache_fp8: bool = False) -> dict[str, Any]:
        """What engine.json's quant_config records under `prequantized` (`kv_cache_fp8`: the engine's KV
        cache is fp8, so the checkpoint's k/v scales are its scales)."""
        record = self._record()
        if self.kv_scales:
            record["checkpoint_kv_cache"] = KV_SCALES_USED if kv_cache_fp8 else KV_SCALES_NOTE
        return record

    def _record(self) -> dict[str, Any]:
        record = {
            "source": self.source,
            "format": self.format,
            "weight_strategy": self.weight_strategy,
            "scales": "per channel, as stored"
            if self.weight_strategy == "channel"
            else "per tensor, broadcast to each channel",
            "checkpoint_activations": STATIC_NOTE if self.static_input_scales else "fp8 per-token dynamic",
        }
        return record


def prequantized_fp8(checkpoint_dir: Path, hf: dict[str, Any]) -> PreQuantizedFP8 | None:
    """The checkpoint's pre-quantized FP8 layout, None for a 16-bit checkpoint; CheckpointError naming
    anything quantized that Kiln does not build (module rules)."""
    where = f"{checkpoint_dir}/config.json"
    if is_modelopt(checkpoint_dir, hf):
        m = modelopt_fp8(checkpoint_dir, hf)
        dtype = _checkpoint_dtype(hf, where)
        return PreQuantizedFP8(
            m.weight_strategy, m.static_input_scales, m.quant_algo, dtype, MODELOPT_SOURCE, m.kv_scales
        )
    qc = hf.get("quantization_config") or hf.get("compression_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise CheckpointError(
            f"{where}: quant_method {method!r} is not supported; Kiln builds 16-bit checkpoints and pre-quantized "
            "FP8 compressed-tensors ones only (quantize with `kiln build --quantization` from a 16-bit checkpoint)"
        )
    if qc.get("sparsity_config"):
        raise CheckpointError(f"{where}: compressed-tensors sparsity_config is not supported")
    kv = qc.get("kv_cache_scheme")
    if kv and (
        (kv.get("num_bits"), kv.get("type"), kv.get("strategy"), kv.get("dynamic"))
        != (8, "float", "tensor", False)
        or kv.get("symmetric") is False
    ):
        raise CheckpointError(
            f"{where}: kv_cache_scheme {kv} is not supported; only static per-tensor symmetric 8-bit float (FP8)"
        )
    ignore = list(qc.get("ignore") or [])
    if any(name not in LM_HEAD_IGNORES for name in ignore):
        raise CheckpointError(
            f"{where}: ignore {ignore} leaves some decoder linears unquantized; Kiln needs every decoder linear "
            "quantized (ignore: [] or ['lm_head'])"
        )
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(
            f"{where}: {len(groups)} compressed-tensors config groups; Kiln supports exactly one"
        )
    name, group = next(iter(groups.items()))
    if list(group.get("targets") or []) != ["Linear"]:
        raise CheckpointError(
            f"{where}: config group {name!r} targets {group.get('targets')}; only ['Linear']"
        )
    strategy = _check_weights(group.get("weights") or {}, f"{where}: config group {name!r} weights")
    if group.get("output_activations"):
        raise CheckpointError(
            f"{where}: config group {name!r}: output activation quantization is not supported"
        )
    static = _check_activations(
        group.get("input_activations"), f"{where}: config group {name!r} input_activations"
    )
    fmt = qc.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(
            f"{where}: compressed-tensors format {fmt!r} is not supported (only {list(FORMATS)})"
        )
    return PreQuantizedFP8(strategy, static, fmt, _checkpoint_dtype(hf, where), kv_scales=bool(kv))


def _check_weights(w: dict[str, Any], where: str) -> str:
    if w.get("num_bits") != 8 or w.get("type") != "float":
        raise CheckpointError(
            f"{where}: {w.get('num_bits')}-bit {w.get('type')} weights are not supported; only 8-bit float (FP8)"
        )
    if w.get("symmetric") is not True:
        raise CheckpointError(f"{where}: asymmetric weights (zero points) are not supported")
    if w.get("dynamic"):
        raise CheckpointError(f"{where}: dynamic weight scales are not supported")
    if w.get("strategy") not in ("channel", "tensor"):
        raise CheckpointError(
            f"{where}: strategy {w.get('strategy')!r} is not supported; only channel or tensor"
        )
    return str(w["strategy"])


def _check_activations(a: dict[str, Any] | None, where: str) -> bool:
    """True for static per-tensor scales, False for dynamic per token (or none)."""
    if not a:
        return False
    if a.get("num_bits") != 8 or a.get("type") != "float" or a.get("symmetric") is False:
        raise CheckpointError(f"{where}: only symmetric 8-bit float activations are supported, got {a}")
    if a.get("dynamic") is True and a.get("strategy") == "token":
        return False
    if a.get("dynamic") is False and a.get("strategy") == "tensor":
        return True
    raise CheckpointError(
        f"{where}: dynamic={a.get('dynamic')!r} strategy={a.get('strategy')!r} is not supported; "
        "only dynamic per token or static per tensor"
    )


def _checkpoint_dtype(hf: dict[str, Any], where: str) -> str:
    """config.json's torch_dtype (or 5.x's dtype), canonical; bfloat16 when it names none."""
    raw = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    name = DTYPE_ALIASES.get(str(raw), str(raw))
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"{where}: torch_dtype {raw!r} is not one Kiln runs")
    return name


def pack_prequantized(
    tensors: Iterable[tuple[str, torch.Tensor]],
    model: ModelConfig,
    pre: PreQuantizedFP8,
    kv_scales: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield (packed name, tensor) for unquantized tensors and (packed weight name, (q e4m3, scale float32
    [N])) for each quantized linear, fused like `pack_hf_state_dict`; CheckpointError for a wrong dtype,
    scale shape, a missing scale or an input_scale the config did not announce. The checkpoint's FP8 k/v
    scales go into `kv_scales` (Kiln's names, float32 [1]) when it is given, else they are dropped."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for packed, tensor in pack_hf_state_dict(_per_channel(tensors, model, pre, kv_scales), model):
        if not packed.endswith((".weight", ".weight_scale")) or _linear(packed) is None:
            yield packed, tensor
            continue
        weight = packed.removesuffix("_scale")
        parts = pending.setdefault(weight, {})
        parts["scale" if packed.endswith("_scale") else "q"] = tensor
        if len(parts) == 2:
            del pending[weight]
            if parts["q"].dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{weight!r} is {parts['q'].dtype}, expected float8_e4m3fn")
            if parts["scale"].shape != (parts["q"].shape[0],):
                raise CheckpointError(f"{scale_name(weight)!r} does not cover the rows of {weight!r}")
            if not bool(torch.isfinite(parts["scale"]).all()):
                raise CheckpointError(f"{scale_name(weight)!r} holds values that are not finite")
            yield weight, (parts["q"], parts["scale"])
    if pending:
        raise CheckpointError(f"checkpoint lacks weights or scales of: {sorted(pending)[:8]}")


def _linear(name: str) -> str | None:
    """'q_proj' for `model.layers.N.self_attn.q_proj.weight`; fused names map to themselves."""
    parts = name.split(".")
    if len(parts) != 6 or parts[0] != "model" or parts[1] != "layers":
        return None
    module = parts[4]
    return module if module in _LINEARS or module in {f.split(".")[1] for f in FUSED_GROUPS} else None


def _rows(model: ModelConfig, linear: str) -> int:
    return {
        "q_proj": model.q_size,
        "k_proj": model.kv_size,
        "v_proj": model.kv_size,
        "gate_proj": model.intermediate_size,
        "up_proj": model.intermediate_size,
    }.get(linear, model.hidden_size)


def _per_channel(
    tensors: Iterable[tuple[str, torch.Tensor]],
    model: ModelConfig,
    pre: PreQuantizedFP8,
    kv_scales: dict[str, torch.Tensor] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors with each weight_scale as float32 [rows], the static input scales dropped and the k/v
    scales taken out (into `kv_scales` when given)."""
    for name, tensor in tensors:
        linear = _linear(name)
        if pre.kv_scales and ".self_attn." in name and name.endswith((".k_scale", ".v_scale")):
            value = tensor.float().reshape(-1)
            if value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value) <= 0:
                raise CheckpointError(f"{name!r} is not one positive finite KV-cache scale: {tensor}")
            if kv_scales is not None:  # model.layers.N.self_attn[.k_proj].k_scale -> ...self_attn.k_scale
                layer = name.split(".self_attn.")[0]
                kv_scales[f"{layer}.self_attn.{name.rsplit('.', 1)[1]}"] = value.clone()
            continue
        if name.endswith(".input_scale") and linear is not None:
            if not pre.static_input_scales:
                raise CheckpointError(
                    f"{name!r}: an input_scale, but the config says activations are dynamic"
                )
            if tensor.numel() != 1:
                raise CheckpointError(
                    f"{name!r} has shape {tuple(tensor.shape)}; a per-tensor scale has one value"
                )
            continue  # dropped: activations are quantized per token at run time
        if name.endswith(".weight_scale") and linear is not None:
            rows = _rows(model, linear)
            if pre.weight_strategy == "tensor" and tensor.numel() == 1:
                tensor = tensor.reshape(1).float().expand(rows).contiguous()
            elif pre.weight_strategy == "channel" and tensor.numel() == rows and tensor.dim() in (1, 2):
                tensor = tensor.reshape(rows).float().contiguous()
            else:
                raise CheckpointError(
                    f"{name!r} has shape {tuple(tensor.shape)}, not a {pre.weight_strategy} scale of {rows} rows"
                )
        elif name == "lm_head.weight" and tensor.dtype == torch.float8_e4m3fn:
            raise CheckpointError(
                "lm_head.weight is FP8; Kiln keeps lm_head in 16 bits (ignore: ['lm_head'])"
            )
        elif name.endswith(("_scale", "_zero_point", "_g_idx")):
            raise CheckpointError(f"unexpected quantization tensor {name!r}")
        yield name, tensor


def fp8_engine_plan(
    pre: PreQuantizedFP8,
    requested: QuantConfig | None,
    dtype: str | None,
    tensor_parallel_size: int = 1,
    kv_cache_fp8: bool = False,
) -> tuple[QuantConfig, str]:
    """The QuantConfig and engine dtype of an engine built from `pre`; ValueError for a conflicting flag.

    Rules: the scheme is fp8 (`--quantization fp8` may be given, nothing else, and no group size); the
    engine's dtype is the checkpoint's (its 16-bit tensors kept as stored) or float32 (exact widening);
    quantized engines run on one rank."""
    if requested is not None and (requested.scheme != "fp8" or requested.group_size is not None):
        raise ValueError(
            f"this checkpoint is already quantized to FP8 ({pre.source}); it builds an fp8 engine only, "
            f"not {requested.scheme}{'' if requested.group_size is None else ' with a group size'}"
        )
    if dtype is not None and dtype not in (pre.dtype, "float32"):
        raise ValueError(
            f"this pre-quantized checkpoint stores its unquantized tensors in {pre.dtype}; build it as "
            f"{pre.dtype} (the default) or float32, not {dtype}"
        )
    if tensor_parallel_size > 1:
        raise ValueError(
            "tensor parallelism does not run quantized native engines yet; build with --tp-size 1"
        )
    quant = QuantConfig(scheme="fp8", prequantized=pre.record(kv_cache_fp8))
    quant.validate()
    return quant, dtype or pre.dtype
