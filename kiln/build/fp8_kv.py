"""The fp8 KV cache of a native build (`kiln build --kv-cache-dtype fp8`): its per-layer scales, measured.

Rules:
- The engine is first built whole, as without the flag (any `--quantization`, engine.json included);
  then it is loaded on the CPU with float32 activations (its weights as stored: quantized ones stay
  quantized) and a cache in float32, and run over the calibration text (kiln.build.calibrate: the same
  text, `--calib-dataset` and `--calib-size` samples of 512 tokens as int8-sq's). Each layer's
  scale = amax / 448 of the K (after the rotary embedding) and V it computed (`kv_cache_scales`), so
  the scales fit the engine that will run, quantized matmuls included.
- The scales go into one more weight file, `KV_SCALES_NAME` (float32 [1] tensors named
  `model.layers.{i}.self_attn.k_scale` / `v_scale`), listed in engine.json with its size and sha256 like
  every weight file; engine.json gains `kv_cache_dtype` "fp8" and `kv_cache_config` (kiln.config.
  KVCacheConfig: the scale layout and the calibration record) and its format version becomes 3
  (kiln.engine_dir.format_version_for). Nothing else of the engine changes.
- A pre-quantized checkpoint that carries FP8 k/v scales (ModelOpt's `kv_cache_quant_algo` FP8,
  compressed-tensors' `kv_cache_scheme`) gives them instead (`add_checkpoint_kv_cache`): no calibration
  runs, and `kv_cache_config.checkpoint` names where they came from.
- It all happens in the build's staging directory, before the directory is moved into place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.build.calibrate import CalibrationSet, calibration_tokens, kv_cache_scales
from kiln.config import KVCacheConfig
from kiln.engine_dir import EngineManifest, format_version_for, sha256_file
from kiln.errors import CheckpointError
from kiln.models.loader import load_model
from kiln.models.tokenizer import Tokenizer
from kiln.models.weights import kv_scale_names
from kiln.progress import build_progress

KV_SCALES_NAME = "kv_cache_scales.safetensors"


def add_fp8_kv_cache(
    out: Path, manifest: EngineManifest, calib: CalibrationSet, calib_size: int, *, progress: bool = False
) -> EngineManifest:
    """Measure the fp8 KV cache's scales of the engine built in `out` (whose engine.json is `manifest`),
    write them beside its weights and save the updated engine.json (see the module rules)."""
    if manifest.backend != "native" or manifest.kv_cache_config is not None:
        raise ValueError(f"{out} is not a native engine with a 16-bit KV cache")
    model, _ = load_model(out, dtype=torch.float32, device="cpu")
    samples = calibration_tokens(Tokenizer(out).encode(calib.text), calib_size)
    num_tokens = sum(map(len, samples))
    with build_progress(enabled=progress) as bar:
        done = bar.step(f"calibrating the fp8 KV cache on {num_tokens} tokens of {calib.dataset}", 1)
        scales = kv_cache_scales(model, samples)
        done()
    del model
    return _save_scales(out, manifest, scales, KVCacheConfig(calibration=calib.record(num_tokens)))


def add_checkpoint_kv_cache(
    out: Path, manifest: EngineManifest, scales: dict[str, torch.Tensor], checkpoint: str
) -> EngineManifest:
    """The fp8 KV cache of the engine built in `out` with a pre-quantized checkpoint's own k/v scales
    (`scales`: kiln names -> float32 [1], every layer's k and v), `checkpoint` naming its layout; no
    calibration runs. CheckpointError when a layer's scale is missing."""
    kv_cache = KVCacheConfig(checkpoint=checkpoint)
    missing = [name for name in kv_scale_names(manifest.model, kv_cache) if name not in scales]
    if missing:
        raise CheckpointError(f"the checkpoint's FP8 KV-cache scales lack {missing[:4]}")
    return _save_scales(out, manifest, scales, kv_cache)


def _save_scales(
    out: Path, manifest: EngineManifest, scales: dict[str, torch.Tensor], kv_cache: KVCacheConfig
) -> EngineManifest:
    """Write `scales` as `KV_SCALES_NAME` beside the weights and save engine.json with `kv_cache`."""
    if manifest.backend != "native" or manifest.kv_cache_config is not None:
        raise ValueError(f"{out} is not a native engine with a 16-bit KV cache")
    path = Path(out) / KV_SCALES_NAME
    save_file(scales, str(path), metadata={"format": "pt"})
    manifest.weight_files[KV_SCALES_NAME] = sha256_file(path)
    manifest.file_sizes[KV_SCALES_NAME] = path.stat().st_size
    manifest.kv_cache_dtype = kv_cache.dtype
    manifest.kv_cache_config = kv_cache
    manifest.format_version = format_version_for(manifest.quant_config, kv_cache)
    manifest.save(out)  # last: its presence marks the directory complete
    return manifest
