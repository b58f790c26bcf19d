"""`kiln build --backend trtllm`: a Hugging Face Llama checkpoint -> TensorRT-LLM engines + engine.json.

Layout of the engine directory it writes:
    engine.json          Kiln's manifest (backend "trtllm"); `extra` says what the engine is tied to
    trtllm/              what tensorrt_llm's `LLM.save()` writes: config.json, rank<N>.engine
    tokenizer files      copied from the checkpoint, so `kiln serve DIR` needs nothing else

Rules:
- `plan_trtllm_build` maps Kiln's flags to the TensorRT-LLM build (BuildConfig + PluginConfig keywords,
  QuantConfig algorithm, CalibConfig keywords). It is pure, so it is unit-tested without the library;
  `build_trtllm_engine` only turns the plan into library objects and runs it.
- The build is always: GPT attention plugin (fused attention) in the model dtype, paged KV cache with
  paged context FMHA (KV reuse and chunked prefill need it), removed input padding, and the GEMM plugin
  for fp16/bf16; multiple optimization profiles unless turned off.
- Quantization: `int8_wo` (INT8 weight-only, W8A16, no calibration), `fp8` (FP8 weights+activations,
  calibrated, needs compute capability >= 8.9) and `int8_sq` (INT8 SmoothQuant W8A8, calibrated).
- `--kv-cache-dtype fp8` is TensorRT-LLM's FP8 KV cache: QuantConfig's `kv_cache_quant_algo` FP8 beside
  any of the above (or none), which TensorRT-LLM calibrates (through ModelOpt) with the same CalibConfig;
  compute capability >= 8.9 and a float16 / bfloat16 base dtype, as for fp8. The scales are TensorRT-LLM's
  own; engine.json records `kv_cache_dtype` "fp8" (and the plan in `extra`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.build.checkpoint import model_config_from_hf, read_hf_config, resolve_checkpoint
from kiln.build.native import (
    checked_generation_defaults,
    copy_tokenizer_files,
    merge_generation_eos,
    read_sampling_defaults,
)
from kiln.config import (
    QUANTIZATION_ALIASES,
    EngineLimits,
    ModelConfig,
    canonical_dtype,
    canonical_kv_cache_dtype,
)
from kiln.engine_dir import EngineManifest, move_into_place, sha256_file
from kiln.errors import CheckpointError
from kiln.trtllm import compat

logger = logging.getLogger(__name__)

ENGINE_SUBDIR = "trtllm"

# Kiln quantization name -> (tensorrt_llm QuantAlgo member, needs a calibration pass).
# QuantConfig._requires_calibration in tensorrt_llm/models/modeling_utils.py: W8A16 does not, FP8 and
# W8A8_SQ_PER_CHANNEL do (through NVIDIA ModelOpt, which the NGC image ships).
QUANTIZATIONS: dict[str, tuple[str, bool]] = {
    "int8_wo": ("W8A16", False),
    "fp8": ("FP8", True),
    "int8_sq": ("W8A8_SQ_PER_CHANNEL", True),
}
# The accepted spellings (int8-wo / int8-sq among them: QUANTIZATION_ALIASES) are kiln.config's, shared
# with the native backend, so the same --quantization name means the same scheme on both.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper and later have FP8 tensor cores
# Kiln KV-cache dtype -> tensorrt_llm QuantAlgo member of QuantConfig.kv_cache_quant_algo (None: the model's
# dtype). An FP8 KV cache makes QuantConfig._requires_calibration true whatever the weights' algorithm.
KV_CACHE_QUANT_ALGOS: dict[str, str | None] = {"auto": None, "fp8": "FP8"}
DEFAULT_CALIB_DATASET = "cnn_dailymail"  # CalibConfig's own default, a Hugging Face dataset name


def canonical_quantization(name: str | None) -> str | None:
    """'w8a16' -> 'int8_wo'; None stays None; ValueError naming the choices for anything else."""
    if name is None or name in ("", "none"):
        return None
    key = QUANTIZATION_ALIASES.get(name.lower(), name.lower())
    if key not in QUANTIZATIONS:  # the same names as kiln.config.QUANTIZATION_NAMES
        raise ValueError(f"unknown TensorRT-LLM quantization {name!r}; choose one of {sorted(QUANTIZATIONS)}")
    return key


@dataclass(slots=True)
class TrtLlmBuildPlan:
    """Everything the TensorRT-LLM build needs, as plain data (what `engine.json` records in `extra`)."""

    dtype: str
    tp_size: int
    build_config: dict[str, Any]  # BuildConfig keywords
    plugin_config: dict[str, Any]  # PluginConfig attributes
    quantization: str | None = None  # Kiln's name
    quant_algo: str | None = None  # tensorrt_llm QuantAlgo member name
    calib_config: dict[str, Any] | None = None  # CalibConfig keywords; None: no calibration
    kv_cache_dtype: str = "auto"  # Kiln's name: "auto" | "fp8"
    kv_cache_quant_algo: str | None = None  # tensorrt_llm QuantAlgo member name of the KV cache
    gather_generation_logits: bool = False  # runtime flag; logprobs need it
    llm_kwargs: dict[str, Any] = field(default_factory=dict)  # other LLM(...) keywords

    def to_extra(self) -> dict[str, Any]:
        return asdict(self)


def plan_trtllm_build(
    model: ModelConfig,
    *,
    dtype: str,
    limits: EngineLimits,
    quantization: str | None = None,
    tp_size: int = 1,
    calib_dataset: str | None = None,
    calib_size: int = 512,
    calib_max_seq_len: int = 512,
    kv_cache_dtype: str | None = None,
    max_input_len: int | None = None,
    multiple_profiles: bool = True,
    gather_logits: bool = False,
) -> TrtLlmBuildPlan:
    """Map Kiln build flags to the TensorRT-LLM build; ValueError for a combination it cannot build."""
    dtype = canonical_dtype(dtype)
    limits.validate()
    if tp_size < 1 or model.num_attention_heads % tp_size or model.num_key_value_heads % tp_size:
        raise ValueError(
            f"tp_size {tp_size} must be >= 1 and divide the attention heads ({model.num_attention_heads}) "
            f"and KV heads ({model.num_key_value_heads})"
        )
    block = limits.block_size
    if block & (block - 1):
        raise ValueError(f"block_size {block} must be a power of two for TensorRT-LLM's paged KV cache")
    max_seq_len = limits.resolved_max_seq_len(model)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no room for a prompt and a generated token")
    # A prompt may take the whole context but one generated token, unless told otherwise.
    max_input_len = max_input_len or max_seq_len - 1
    if not 1 <= max_input_len < max_seq_len:
        raise ValueError(f"max_input_len ({max_input_len}) must be in [1, max_seq_len ({max_seq_len}))")

    quantization = canonical_quantization(quantization)
    quant_algo, needs_calibration = QUANTIZATIONS[quantization] if quantization else (None, False)
    kv_cache_dtype = canonical_kv_cache_dtype(kv_cache_dtype)
    kv_cache_quant_algo = KV_CACHE_QUANT_ALGOS[kv_cache_dtype]
    needs_calibration = needs_calibration or kv_cache_quant_algo is not None
    if calib_dataset is not None and not needs_calibration:
        raise ValueError(
            f"calib_dataset only applies to calibrated quantization (fp8, int8_sq) or an fp8 KV cache, "
            f"not {quantization}"
        )
    if needs_calibration and calib_size < 1:
        raise ValueError(f"calib_size must be >= 1, got {calib_size}")
    if quantization == "fp8" and dtype == "float32":
        raise ValueError("fp8 quantization needs a float16 or bfloat16 base dtype")
    if kv_cache_quant_algo is not None and dtype == "float32":
        raise ValueError("an fp8 KV cache (--kv-cache-dtype fp8) needs a float16 or bfloat16 base dtype")

    half = dtype in ("float16", "bfloat16")
    plugin_config: dict[str, Any] = {
        "dtype": dtype,
        "gpt_attention_plugin": dtype,  # fused attention, in-place KV cache update
        "gemm_plugin": dtype if half else None,  # cuBLASLt GEMMs for fp16/bf16
        "remove_input_padding": True,  # packed ragged batches
        "paged_kv_cache": True,
        "tokens_per_block": block,
        "context_fmha": True,
        "use_paged_context_fmha": True,  # prefill reads the paged cache: KV reuse and chunked prefill
        "multiple_profiles": multiple_profiles,
    }
    build_config: dict[str, Any] = {
        "max_batch_size": limits.max_batch_size,
        "max_input_len": max_input_len,
        "max_seq_len": max_seq_len,
        "max_num_tokens": limits.max_num_tokens,
        "max_beam_width": 1,
        "gather_context_logits": False,
    }
    calib = None
    if needs_calibration:
        calib = {
            "calib_dataset": calib_dataset or DEFAULT_CALIB_DATASET,
            "calib_batches": calib_size,
            "calib_batch_size": 1,
            "calib_max_seq_length": min(calib_max_seq_len, max_seq_len),
        }
    return TrtLlmBuildPlan(
        dtype=dtype,
        tp_size=tp_size,
        build_config=build_config,
        plugin_config=plugin_config,
        quantization=quantization,
        quant_algo=quant_algo,
        calib_config=calib,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_quant_algo=kv_cache_quant_algo,
        gather_generation_logits=gather_logits,
        llm_kwargs={"enable_chunked_prefill": True},
    )


def _set_attributes(obj: Any, values: dict[str, Any], what: str) -> None:
    for key, value in values.items():
        if not hasattr(obj, key):
            raise RuntimeError(f"the installed tensorrt_llm {what} has no {key!r}; Kiln targets 1.2.x")
        setattr(obj, key, value)


def build_trtllm_engine(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "float16",
    limits: EngineLimits | None = None,
    quantization: str | None = None,
    tp_size: int = 1,
    calib_dataset: str | None = None,
    calib_size: int = 512,
    kv_cache_dtype: str | None = None,
    served_model_name: str | None = None,
    max_input_len: int | None = None,
    multiple_profiles: bool = True,
    gather_logits: bool = False,
    overwrite: bool = False,
) -> EngineManifest:
    """Compile a Hugging Face checkpoint (directory or hub id) into TensorRT-LLM engines under output_dir.

    Needs tensorrt_llm 1.2 and the GPU(s) the engine will serve on (BackendUnavailableError otherwise);
    CheckpointError / OfflineError for the checkpoint, ValueError for flags it cannot build, and
    FileExistsError for a non-empty output_dir unless overwrite=True. Like the native build, it writes
    into a sibling staging directory renamed into place at the end, engine.json last.
    """

    limits = limits or EngineLimits()
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    resolved = resolve_checkpoint(checkpoint)
    if resolved.kind != "hf":
        raise CheckpointError(
            f"{resolved.source}: TensorRT-LLM builds need a Hugging Face safetensors checkpoint, not a GGUF file"
        )
    model = model_config_from_hf(read_hf_config(resolved.path), where=resolved.source)
    plan = plan_trtllm_build(
        model,
        dtype=dtype,
        limits=limits,
        quantization=quantization,
        tp_size=tp_size,
        calib_dataset=calib_dataset,
        calib_size=calib_size,
        kv_cache_dtype=kv_cache_dtype,
        max_input_len=max_input_len,
        multiple_profiles=multiple_profiles,
        gather_logits=gather_logits,
    )
    # Before the minutes of a TensorRT build: a bad generation_config.json fails now.
    defaults = checked_generation_defaults(read_sampling_defaults(resolved.path))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        manifest = _build_into(
            resolved.path, resolved.source, staging, model, plan, limits, served_model_name
        )
        manifest.generation_defaults = defaults
        tokenizer_files = copy_tokenizer_files(resolved.path, staging)
        merge_generation_eos(model, staging)
        shutil.copyfile(resolved.path / "config.json", staging / "config.json")  # tensorrt_llm reads it
        manifest.tokenizer_files = [*tokenizer_files, "config.json"]
        for name in manifest.tokenizer_files:
            manifest.file_sizes[name] = (staging / name).stat().st_size
        manifest.save(staging)  # last: its presence marks the directory complete
        move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _build_into(
    checkpoint_dir: Path,
    source: str,
    out: Path,
    model: ModelConfig,
    plan: TrtLlmBuildPlan,
    limits: EngineLimits,
    served_model_name: str | None,
) -> EngineManifest:
    """Run the TensorRT-LLM build into out/trtllm and return the (not yet saved) manifest."""

    trtllm = compat.import_tensorrt_llm()
    LLM = compat.import_trt_engine_llm()
    gpu = compat.probe_gpu()
    if plan.quantization == "fp8" and gpu.compute_capability < FP8_MIN_COMPUTE_CAPABILITY:
        raise ValueError(f"fp8 needs compute capability >= 8.9; {gpu.name} is {gpu.sm}")
    if plan.kv_cache_quant_algo is not None and gpu.compute_capability < FP8_MIN_COMPUTE_CAPABILITY:
        raise ValueError(f"--kv-cache-dtype fp8 needs compute capability >= 8.9; {gpu.name} is {gpu.sm}")
    if plan.tp_size > gpu.count:
        raise ValueError(f"tp_size {plan.tp_size} needs {plan.tp_size} GPUs; {gpu.count} visible")

    from tensorrt_llm.llmapi import BuildConfig, CalibConfig, KvCacheConfig, QuantAlgo, QuantConfig

    build_config = BuildConfig(**plan.build_config)
    _set_attributes(build_config.plugin_config, plan.plugin_config, "PluginConfig")
    kwargs: dict[str, Any] = dict(plan.llm_kwargs)
    quant_kwargs = quant_config_kwargs(plan)
    if quant_kwargs:
        kwargs["quant_config"] = QuantConfig(**{k: getattr(QuantAlgo, v) for k, v in quant_kwargs.items()})
    if plan.calib_config is not None:
        kwargs["calib_config"] = CalibConfig(**plan.calib_config)

    engine_dir = out / ENGINE_SUBDIR
    logger.info("building TensorRT-LLM engine from %s (%s, tp=%d)", source, plan.dtype, plan.tp_size)
    llm = LLM(
        model=str(checkpoint_dir),
        tokenizer=str(checkpoint_dir),
        dtype=plan.dtype,
        tensor_parallel_size=plan.tp_size,
        build_config=build_config,
        gather_generation_logits=plan.gather_generation_logits,
        # The LLM starts an executor after building; keep its KV cache small, it is thrown away.
        kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.1),
        **kwargs,
    )
    try:
        llm.save(str(engine_dir))
    finally:
        llm.shutdown()

    engine_files = sorted(p for p in engine_dir.rglob("*") if p.is_file())
    weight_files = {str(p.relative_to(out)): sha256_file(p) for p in engine_files}
    default_name = source if not Path(source).exists() else Path(source.rstrip("/")).name
    return EngineManifest(
        backend="trtllm",
        model=model,
        dtype=plan.dtype,
        weight_files=weight_files,
        limits=limits,
        file_sizes={name: (out / name).stat().st_size for name in weight_files},
        served_model_name=served_model_name or default_name,
        source=source,
        quantization=plan.quantization,
        kv_cache_dtype=plan.kv_cache_dtype,
        extra=trtllm_manifest_extra(
            plan, compat.build_environment(gpu, str(trtllm.__version__), plan.tp_size)
        ),
    )


def quant_config_kwargs(plan: TrtLlmBuildPlan) -> dict[str, str]:
    """tensorrt_llm QuantConfig keyword -> QuantAlgo member name, of the algorithms the plan sets ({}: none)."""
    algos = {"quant_algo": plan.quant_algo, "kv_cache_quant_algo": plan.kv_cache_quant_algo}
    return {key: algo for key, algo in algos.items() if algo is not None}


def trtllm_manifest_extra(plan: TrtLlmBuildPlan, environment: dict[str, Any]) -> dict[str, Any]:
    """engine.json `extra` of a TensorRT-LLM engine: where it runs (environment) and how it was built."""
    return {**plan.to_extra(), **environment, "engine_subdir": ENGINE_SUBDIR}
