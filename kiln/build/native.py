"""The native build: checkpoint -> engine directory that Kiln's PyTorch engine serves.

An engine directory holds:
- `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards of ~2 GB plus
  `model.safetensors.index.json`; kiln.build.shards writes them): weights packed by
  `kiln.models.weights.pack_hf_state_dict` (fused qkv_proj and gate_up_proj, no lm_head when tied),
  all in the engine's dtype; with `quantization` (int8_wo, fp8, int8_sq) the linear layers' weights
  are stored quantized instead, each beside its float32 `...weight_scale` in the same shard
  (kiln.config.QuantConfig says the layout), quantized from the checkpoint's values by
  kiln.kernels.quant_reference;
- a pre-quantized FP8 checkpoint (compressed-tensors; kiln.build.prequantized) builds the fp8 engine
  from its own e4m3 weights and scales, stored as given (scales as float32 per channel), in its dtype;
- int8_sq (SmoothQuant) first builds the unquantized float32 engine into a temporary sibling
  directory, runs it on the CPU over the calibration text (kiln.build.calibrate) for the activations'
  per-channel abs-max, derives the smoothing factors, folds 1/s into the RMSNorms feeding qkv_proj and
  gate_up_proj, stores s beside o_proj and down_proj, and quantizes W * s; it holds the float32 model
  in memory (4 bytes a parameter) and runs every calibration token through it on the CPU;
- `kv_cache_dtype` "fp8" (`--kv-cache-dtype fp8`, with any quantization or none): once the engine is
  built, its fp8 KV cache's per-layer scales are measured on it over the calibration text
  (kiln.build.fp8_kv) and stored in one more weight file, `kv_cache_scales.safetensors`;
- the tokenizer files (and `generation_config.json` when the checkpoint has one);
- `engine.json`, written last; its `generation_defaults` are the sampling fields of the checkpoint's
  `generation_config.json` (checked as a request's would be, so a bad value fails the build, not every
  request), or what the builder passes (`generation_defaults=`, e.g. the default model's model card).

Everything is written into a temporary sibling directory that is renamed into place at the end, so
a crash or Ctrl-C never leaves a directory that looks like a finished engine. Tensors stream from the
checkpoint to the shard being written, so a build holds at most one shard plus the fused groups in
progress in memory, never the whole model twice.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kiln.build.checkpoint import (
    ResolvedCheckpoint,
    hf_tensor_count,
    iter_hf_tensors,
    model_config_from_hf,
    read_hf_config,
    resolve_checkpoint,
)
from kiln.build.gguf import expected_tensor_count, load_gguf, read_gguf_config, save_gguf_tokenizer
from kiln.build.prequantized import PreQuantizedFP8, fp8_engine_plan, prequantized_fp8
from kiln.build.shards import MAX_SHARD_BYTES, drain, write_packed_weights
from kiln.build.tiny import write_tiny_checkpoint
from kiln.config import (
    DEFAULT_SMOOTHQUANT_ALPHA,
    DTYPES,
    SMOOTH_FOLDED_INTO,
    EngineLimits,
    ModelConfig,
    QuantConfig,
    canonical_dtype,
    canonical_kv_cache_dtype,
    canonical_quantization,
)
from kiln.engine.sampling_params import SamplingParams
from kiln.engine_dir import (
    MANIFEST_NAME,
    EngineManifest,
    checkpoint_generation_defaults,
    format_version_for,
    move_into_place,
    sha256_file,
)
from kiln.errors import CheckpointError, RequestValidationError
from kiln.kernels.quant_reference import smoothing_factors
from kiln.models.parallel import check_tensor_parallel
from kiln.models.weight_files import WEIGHTS_INDEX_NAME
from kiln.progress import build_progress, counted

DEFAULT_CALIB_SIZE = 512  # calibration samples (TensorRT-LLM's default too)
# Copied from a Hugging Face checkpoint directory when present. At least one of the first three
# must exist: without a tokenizer the engine cannot serve text.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def build_engine(
    checkpoint: str | Path,
    output_dir: Path,
    *,
    dtype: str | None = None,
    limits: EngineLimits | None = None,
    served_model_name: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    source: str | None = None,
    generation_defaults: dict[str, float | int] | None = None,
    quantization: str | None = None,
    quant_group_size: int | None = None,
    smoothquant_alpha: float | None = None,
    calib_dataset: str | Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    tensor_parallel_size: int = 1,
    kv_cache_dtype: str | None = None,
) -> EngineManifest:
    """Build a native engine from a HF directory, a .gguf file or a hub id; returns its manifest.

    source: what engine.json records as the origin (default: checkpoint as given). max_shard_bytes:
    weight files are split when larger (HF-style shards + model.safetensors.index.json).
    generation_defaults: request sampling defaults to record (request field names), over those of the
    checkpoint's generation_config.json. quantization: None, "int8_wo" or "fp8" (any spelling
    kiln.config.canonical_quantization accepts); quant_group_size: int8_wo's scales per group of that
    many inputs instead of per output channel. int8_sq only: smoothquant_alpha (default 0.5),
    calib_dataset (a UTF-8 text file; default the standard library's pydoc_data.topics) and
    calib_size (samples of kiln.build.calibrate.CALIB_SEQ_LEN tokens). tensor_parallel_size > 1: checked
    against the model (kiln.models.parallel) and recorded in engine.json's `extra` as the engine's default
    tensor-parallel size (`kiln serve --tensor-parallel-size` overrides it); unquantized engines only.
    dtype: None means float16, except for a pre-quantized FP8 checkpoint (kiln.build.prequantized), which
    builds an fp8 engine from its stored e4m3 weights in its own dtype (`fp8_engine_plan` says which
    quantization and dtype may be asked for). kv_cache_dtype: "auto" (None: the engine's dtype) or "fp8"
    (E4M3 with per-layer scales calibrated on calib_dataset / calib_size, as int8_sq's; kiln.build.fp8_kv).

    Raises CheckpointError / OfflineError for the checkpoint, ValueError for a bad dtype, limits,
    quantization or calibration option, and FileExistsError when output_dir exists and is not empty, unless overwrite=True (the old
    directory is then replaced only after the new one is complete).
    """
    requested_dtype = None if dtype is None else canonical_dtype(dtype)
    limits = limits or EngineLimits()
    limits.validate()
    quant = native_quant_config(quantization, quant_group_size, smoothquant_alpha)
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tensor_parallel_size}")
    if quant is not None and tensor_parallel_size > 1:
        raise ValueError(
            "tensor parallelism does not run quantized native engines yet; build with --tp-size 1"
        )
    kv_fp8 = canonical_kv_cache_dtype(kv_cache_dtype) == "fp8"
    calibration = None
    if (quant is not None and quant.scheme == "int8_sq") or kv_fp8:
        from kiln.build.calibrate import calibration_set  # deferred: calibrated builds only

        if calib_size < 1:
            raise ValueError(f"calibration size must be >= 1 sample, got {calib_size}")
        calibration = (calibration_set(calib_dataset), calib_size)
    elif calib_dataset is not None:
        raise ValueError("a calibration dataset applies to int8_sq (SmoothQuant) and an fp8 KV cache only")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    resolved = resolve_checkpoint(checkpoint)
    if source is not None:
        resolved.source = source
    prequant = (
        None if resolved.kind != "hf" else prequantized_fp8(resolved.path, read_hf_config(resolved.path))
    )
    checkpoint_kv: dict[str, Any] | None = None  # a pre-quantized checkpoint's own FP8 k/v scales
    if prequant is not None:
        quant, dtype = fp8_engine_plan(prequant, quant, requested_dtype, tensor_parallel_size, kv_fp8)
        if kv_fp8 and prequant.kv_scales:
            if calib_dataset is not None or calib_size != DEFAULT_CALIB_SIZE:
                raise ValueError(
                    "this checkpoint carries its own FP8 KV-cache scales, which the fp8 KV cache uses: "
                    "--calib-dataset / --calib-size do not apply"
                )
            checkpoint_kv, calibration = {}, None
    else:
        dtype = requested_dtype or "float16"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        manifest = _build_into(
            resolved,
            staging,
            dtype,
            limits,
            served_model_name,
            progress,
            max_shard_bytes,
            generation_defaults,
            quant,
            calibration,
            tensor_parallel_size=tensor_parallel_size,
            prequantized=prequant,
            kv_scales=checkpoint_kv,
        )
        if kv_fp8:
            from kiln.build import fp8_kv  # deferred: fp8 KV-cache builds only

            if checkpoint_kv is not None:
                assert prequant is not None
                manifest = fp8_kv.add_checkpoint_kv_cache(staging, manifest, checkpoint_kv, prequant.source)
            else:
                assert calibration is not None
                manifest = fp8_kv.add_fp8_kv_cache(staging, manifest, *calibration, progress=progress)
        move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def build_tiny_engine(
    output_dir: Path,
    seed: int = 0,
    *,
    dtype: str = "float32",
    limits: EngineLimits | None = None,
    served_model_name: str = "tiny",
    progress: bool = False,
    overwrite: bool = False,
    quantization: str | None = None,
    quant_group_size: int | None = None,
    smoothquant_alpha: float | None = None,
    calib_dataset: str | Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    tensor_parallel_size: int = 1,
    kv_cache_dtype: str | None = None,
    **tiny_options: Any,
) -> EngineManifest:
    """Build an engine from `write_tiny_checkpoint(seed=seed, **tiny_options)`: `kiln build --tiny`."""
    options = "".join(f", {k}={v!r}" for k, v in sorted(tiny_options.items()))
    with tempfile.TemporaryDirectory(prefix="kiln-tiny-") as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp), seed=seed, **tiny_options)
        manifest = build_engine(
            checkpoint,
            output_dir,
            dtype=dtype,
            limits=limits,
            served_model_name=served_model_name,
            progress=progress,
            overwrite=overwrite,
            source=f"tiny(seed={seed}{options})",
            quantization=quantization,
            quant_group_size=quant_group_size,
            smoothquant_alpha=smoothquant_alpha,
            calib_dataset=calib_dataset,
            calib_size=calib_size,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_dtype=kv_cache_dtype,
        )
    return manifest


def _build_into(
    resolved: ResolvedCheckpoint,
    out: Path,
    dtype: str,
    limits: EngineLimits,
    served_model_name: str | None,
    progress: bool,
    max_shard_bytes: int,
    generation_defaults: dict[str, float | int] | None = None,
    quant: QuantConfig | None = None,
    calibration: tuple[Any, int] | None = None,
    *,
    tensor_parallel_size: int = 1,
    prequantized: PreQuantizedFP8 | None = None,
    kv_scales: dict[str, Any] | None = None,
) -> EngineManifest:
    if quant is not None and quant.scheme == "int8_sq":
        assert calibration is not None
        return _build_smoothquant(
            resolved,
            out,
            dtype,
            limits,
            served_model_name,
            progress,
            max_shard_bytes,
            generation_defaults,
            quant,
            *calibration,
        )
    extra: dict[str, Any] = {}
    with build_progress(enabled=progress) as bar:
        if resolved.kind == "gguf":
            hf = read_gguf_config(resolved.path)
            step = bar.step("dequantizing GGUF", expected_tensor_count(hf))
            gguf = load_gguf(resolved.path, hf_config=hf, dtype=DTYPES[dtype], on_tensor=step)
            tensors, count = drain(gguf.tensors), len(gguf.tensors)
            tokenizer_files = save_gguf_tokenizer(resolved.path, out)
            extra["gguf_file_type"] = gguf.file_type
            default_name = resolved.path.stem
        else:
            hf = read_hf_config(resolved.path)
            tensors, count = iter_hf_tensors(resolved.path), hf_tensor_count(resolved.path)
            tokenizer_files = copy_tokenizer_files(resolved.path, out)
            # A hub id names the model ("org/name"); for a local directory its name does.
            default_name = resolved.source if resolved.from_hub else resolved.path.name
        model = model_config_from_hf(hf, where=resolved.source)
        if quant is not None:
            quant.validate(model)
        if tensor_parallel_size > 1:  # the engine's default; kiln serve --tensor-parallel-size overrides it
            check_tensor_parallel(model, tensor_parallel_size)
            extra["tensor_parallel_size"] = tensor_parallel_size
        merge_generation_eos(model, out)
        defaults = checked_generation_defaults({**read_sampling_defaults(out), **(generation_defaults or {})})
        what = dtype if quant is None else f"{dtype}, linears {quant.scheme}"
        if prequantized is not None:
            what += f" as stored, {prequantized.weight_strategy} scales"
        step = bar.step(f"packing weights ({what})", count)
        sizes = write_packed_weights(
            counted(tensors, step),
            model,
            out,
            DTYPES[dtype],
            max_shard_bytes,
            quant,
            prequantized=prequantized,
            kv_scales=kv_scales,
        )

    weight_files = {name: sha256_file(out / name) for name in sizes if name.endswith(".safetensors")}
    for name in tokenizer_files:
        sizes[name] = (out / name).stat().st_size
    manifest = EngineManifest(
        backend="native",
        model=model,
        dtype=dtype,
        weight_files=weight_files,
        limits=limits,
        tokenizer_files=tokenizer_files,
        file_sizes=sizes,
        served_model_name=served_model_name or default_name,
        source=resolved.source,
        quantization=None if quant is None else quant.scheme,
        quant_config=quant,
        format_version=format_version_for(quant),
        extra=extra,
        generation_defaults=defaults,
    )
    manifest.save(out)  # last: its presence marks the directory complete
    return manifest


def _build_smoothquant(
    resolved: ResolvedCheckpoint,
    out: Path,
    dtype: str,
    limits: EngineLimits,
    served_model_name: str | None,
    progress: bool,
    max_shard_bytes: int,
    generation_defaults: dict[str, float | int] | None,
    quant: QuantConfig,
    calib: Any,
    calib_size: int,
) -> EngineManifest:
    """int8_sq: build the float32 engine, calibrate on it, then write the smoothed, quantized one (module rules)."""
    import torch  # deferred: the build's other paths stream tensors without it

    from kiln.build.calibrate import activation_amax, calibration_tokens  # deferred: int8_sq builds only
    from kiln.models.loader import load_model  # deferred: int8_sq builds only
    from kiln.models.tokenizer import Tokenizer  # deferred: int8_sq builds only

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.calibration-", dir=out.parent) as tmp:
        ref_dir = Path(tmp)
        ref = _build_into(
            resolved,
            ref_dir,
            "float32",
            limits,
            served_model_name,
            progress,
            max_shard_bytes,
            generation_defaults,
        )
        quant.validate(ref.model)
        model, _ = load_model(ref_dir, dtype=torch.float32, device="cpu")
        samples = calibration_tokens(Tokenizer(ref_dir).encode(calib.text), calib_size)
        with build_progress(enabled=progress) as bar:
            bar.step(f"calibrating on {sum(map(len, samples))} tokens of {calib.dataset}", 1)
            amax = activation_amax(model, samples, quant)
        quant.calibration = calib.record(sum(map(len, samples)))
        params = dict(model.named_parameters())
        weights, explicit = smooth_weights(params, amax, quant)
        del model
        with build_progress(enabled=progress) as bar:
            step = bar.step(f"packing weights ({dtype}, linears int8_sq)", len(params))
            sizes = write_packed_weights(
                counted(weights.items(), step),
                ref.model,
                out,
                DTYPES[dtype],
                max_shard_bytes,
                quant,
                packed=True,
                smooth_scales=explicit,
            )
        weight_names = set(ref.weight_files) | {WEIGHTS_INDEX_NAME, MANIFEST_NAME}
        for path in ref_dir.iterdir():
            if path.is_file() and path.name not in weight_names:
                shutil.copyfile(path, out / path.name)
                sizes[path.name] = path.stat().st_size
    weight_files = {name: sha256_file(out / name) for name in sizes if name.endswith(".safetensors")}
    manifest = EngineManifest(
        backend="native",
        model=ref.model,
        dtype=dtype,
        weight_files=weight_files,
        limits=limits,
        tokenizer_files=ref.tokenizer_files,
        file_sizes=sizes,
        served_model_name=ref.served_model_name,
        source=resolved.source,
        quantization=quant.scheme,
        quant_config=quant,
        format_version=format_version_for(quant),
        extra=ref.extra,
        generation_defaults=ref.generation_defaults,
    )
    manifest.save(out)  # last: its presence marks the directory complete
    return manifest


def smooth_weights(
    params: dict[str, Any], amax: dict[str, Any], quant: QuantConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SmoothQuant applied to packed float32 tensors: (tensors with each quantized weight W * s and each
    RMSNorm feeding qkv_proj / gate_up_proj divided by s, {weight name: s} of the linears that keep s
    explicitly). s = smoothing_factors(amax[weight], max |W_j| over the weight's rows, alpha)."""
    assert quant.smoothquant_alpha is not None
    out, explicit = dict(params), {}
    for name in amax:
        weight = params[name]
        s = smoothing_factors(amax[name], weight.abs().amax(dim=0), quant.smoothquant_alpha)
        out[name] = weight * s[None, :]
        prefix, linear = name.split(".", 3)[:3], name.split(".", 3)[3].removesuffix(".weight")
        norm = SMOOTH_FOLDED_INTO.get(linear)
        if norm is None:
            explicit[name] = s
        else:
            norm_name = ".".join([*prefix, norm, "weight"])
            out[norm_name] = out[norm_name] / s
    return out, explicit


def native_quant_config(
    quantization: str | None, group_size: int | None = None, smoothquant_alpha: float | None = None
) -> QuantConfig | None:
    """The QuantConfig a native build writes for these flags (None: unquantized); ValueError for a
    scheme the native backend does not run, a group size without int8_wo or an alpha without int8_sq."""
    scheme = canonical_quantization(quantization)
    if scheme is None:
        if group_size is not None:
            raise ValueError("a quantization group size needs --quantization int8-wo")
        if smoothquant_alpha is not None:
            raise ValueError("a SmoothQuant alpha needs --quantization int8-sq")
        return None
    if scheme == "int8_sq" and smoothquant_alpha is None:
        smoothquant_alpha = DEFAULT_SMOOTHQUANT_ALPHA
    quant = QuantConfig(scheme=scheme, group_size=group_size, smoothquant_alpha=smoothquant_alpha)
    quant.validate()
    return quant


def copy_tokenizer_files(checkpoint_dir: Path, out: Path) -> list[str]:
    present = [name for name in TOKENIZER_FILES if (checkpoint_dir / name).is_file()]
    if not {"tokenizer.json", "tokenizer.model", "vocab.json"} & set(present):
        raise CheckpointError(
            f"{checkpoint_dir} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
        )
    for name in present:
        shutil.copyfile(checkpoint_dir / name, out / name)
    return present


def merge_generation_eos(model: ModelConfig, out: Path) -> None:
    """Add generation_config.json's eos ids (chat models list their end-of-turn token there)."""
    path = out / "generation_config.json"
    if not path.is_file():
        return
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"generation_config.json is not valid JSON: {exc}") from exc
    extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    model.eos_token_ids = list(dict.fromkeys([*model.eos_token_ids, *extra]))


def read_sampling_defaults(directory: Path) -> dict[str, float | int]:
    """The sampling fields of `directory`'s generation_config.json (none without one)."""
    try:
        return checkpoint_generation_defaults(directory)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def checked_generation_defaults(defaults: dict[str, float | int]) -> dict[str, float | int]:
    """`defaults`, once they pass the checks a request's fields pass (CheckpointError naming the field):
    recorded values that every request omitting them would fail on must fail the build instead."""
    try:
        SamplingParams(**defaults).validate()  # type: ignore[arg-type]
    except (TypeError, RequestValidationError) as exc:
        raise CheckpointError(f"generation defaults {defaults}: {exc}") from exc
    return dict(defaults)


__all__ = ["MANIFEST_NAME", "build_engine", "build_tiny_engine"]
