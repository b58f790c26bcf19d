"""Calibration passes over a text: SmoothQuant's activation abs-max, and the fp8 KV cache's scales.

- SmoothQuant (`activation_amax`): the unquantized model (float32 on the CPU) runs over a calibration
  text in prefills of `CALIB_SEQ_LEN` tokens; every call of torch's linear on one of a layer's packed
  weights (qkv_proj, o_proj, gate_up_proj, down_proj) records max |x_j| over that call's tokens, kept as
  the running maximum per channel. The calls are seen through a TorchFunctionMode keyed by the weight
  tensor, so the model's own forward runs unchanged and the statistics are of exactly the inputs it computes.
- The fp8 KV cache (`kv_cache_scales`): the engine's model (float32 activations on the CPU, its weights
  as the engine stores them, a cache in float32) runs the same prefills, and each layer's K and V amax is
  read from the cache it filled: K after the rotary embedding, exactly what an fp8 cache will hold.
  scale = amax / 448 (kiln.config.KVCacheConfig).

Rules:
- The default text is `pydoc_data.topics` of the standard library (the English text of the Python docs'
  topics, every topic in sorted order, joined by blank lines): a real corpus that ships offline with
  every Python. `--calib-dataset PATH` takes the user's own UTF-8 text file instead.
- `calib_size` is the number of samples, each `CALIB_SEQ_LEN` tokens (as TensorRT-LLM's calibration
  counts them), taken from the start of the tokenized text; a text shorter than that is used whole.
- Deterministic: same model, text and size give the same statistics. engine.json records the set's
  name (or file path), the sha256 of its text and the number of tokens run (`CalibrationSet.record`).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.config import FP8_E4M3_MAX, KVCacheConfig, QuantConfig
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kvcache.tensors import allocate_kv_cache
from kiln.models.llama import LlamaForCausalLM
from kiln.models.weights import kv_scale_names, quantized_weight_names

CALIB_SEQ_LEN = 512
_BLOCK = 16
_FP8_KV = KVCacheConfig()  # the layout the measured scales are for


@dataclass(slots=True)
class CalibrationSet:
    """A calibration text and how engine.json names it."""

    dataset: str  # "pydoc_data.topics (Python 3.11.x)" or the file's path
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self, num_tokens: int) -> dict[str, Any]:
        return {"dataset": self.dataset, "sha256": self.sha256, "num_tokens": num_tokens}


def calibration_set(path: str | Path | None = None) -> CalibrationSet:
    """The text at `path` (UTF-8), or the standard library's pydoc_data.topics when None."""
    if path is None:
        from pydoc_data.topics import topics  # deferred: 0.8 MB of text, needed by int8_sq builds only

        version = ".".join(map(str, sys.version_info[:3]))
        text = "\n\n".join(topics[key] for key in sorted(topics))
        return CalibrationSet(f"pydoc_data.topics (Python {version})", text)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration dataset {file}: {exc}") from exc
    if not text.strip():
        raise ValueError(f"calibration dataset {file} is empty")
    return CalibrationSet(str(file.resolve()), text)


def calibration_tokens(token_ids: list[int], calib_size: int) -> list[list[int]]:
    """The first `calib_size` samples of CALIB_SEQ_LEN tokens (the last one may be shorter)."""
    if calib_size < 1:
        raise ValueError(f"calibration size must be >= 1 sample, got {calib_size}")
    ids = token_ids[: calib_size * CALIB_SEQ_LEN]
    return [ids[i : i + CALIB_SEQ_LEN] for i in range(0, len(ids), CALIB_SEQ_LEN)]


class _AbsMaxRecorder(torch.overrides.TorchFunctionMode):
    """Records the running per-channel max |x| of every torch linear call on a watched weight."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.amax: dict[str, torch.Tensor] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            name = self.watched.get(id(weight))
            if name is not None:
                x = args[0].detach()
                seen = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                old = self.amax.get(name)
                self.amax[name] = seen if old is None else torch.maximum(old, seen)
        return func(*args, **kwargs)


def prefill(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """One prefill of `token_ids` through the model's own forward over a fresh paged cache: hidden [T, H]."""
    return _prefill_with_cache(model, token_ids)[0]


def _prefill_with_cache(
    model: LlamaForCausalLM, token_ids: list[int]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`prefill`, and the cache it filled (the model's KV-cache dtype; slots past the tokens are 0)."""
    device = model.model.embed_tokens.weight.device  # whatever the scheme
    n = len(token_ids)
    caches = allocate_kv_cache(model.config, -(-n // _BLOCK), _BLOCK, model.kv_cache_dtype, device)
    meta = AttentionMetadata.one_prompt(n, _BLOCK, device)
    positions = torch.arange(n, device=device)
    with torch.no_grad():
        return model(torch.tensor(token_ids, device=device), positions, caches, meta), caches


def activation_amax(
    model: LlamaForCausalLM, samples: list[list[int]], quant: QuantConfig
) -> dict[str, torch.Tensor]:
    """Packed weight name (of each linear `quant` quantizes) -> float32 [K]: max |input_j| over `samples`.

    The model must be unquantized (its linears run through torch's linear)."""
    if model.quant is not None:
        raise ValueError("calibration runs the unquantized model")
    params = dict(model.named_parameters())
    names = quantized_weight_names(model.config, quant)
    recorder = _AbsMaxRecorder({id(params[name]): name for name in names})
    with recorder:
        for sample in samples:
            prefill(model, sample)
    missing = sorted(set(names) - set(recorder.amax))
    if missing:
        raise RuntimeError(f"calibration saw no input of {missing[:4]}")
    return recorder.amax


def kv_cache_scales(model: LlamaForCausalLM, samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """The fp8 KV cache's scale tensors (`kv_scale_names` -> float32 [1]): per layer, max |K| (after the
    rotary embedding) and max |V| over every token of `samples`, divided by 448; 1 where the max is 0.

    The model must cache K and V in its own dtype (no `kv_cache`): the values measured are the ones an
    fp8 cache is then given to hold."""
    if model.kv_cache is not None:
        raise ValueError("KV-cache calibration runs the model with a cache in its own dtype, not fp8")
    amax = torch.zeros(model.config.num_hidden_layers, 2, dtype=torch.float32)
    for sample in samples:
        _, caches = _prefill_with_cache(model, sample)
        seen = torch.stack([torch.stack([k.abs().amax(), v.abs().amax()]) for k, v in caches]).float()
        amax = torch.maximum(amax, seen.cpu())
    scales = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    names = kv_scale_names(model.config, _FP8_KV)
    return {name: scale.reshape(1).clone() for name, scale in zip(names, scales.flatten(), strict=True)}
