"""`load_model`: an engine directory or a Hugging Face checkpoint directory -> a ready LlamaForCausalLM.

Memory rule: the module is built on the meta device (no weights allocated), then given
uninitialised storage in the target dtype on the target device, then filled one tensor at a time
from safetensors. The host never holds a float32 copy of the model, nor two copies of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.config import DTYPES, KVCacheConfig, ModelConfig, QuantConfig, canonical_dtype
from kiln.engine_dir import MANIFEST_NAME, EngineManifest
from kiln.errors import CheckpointError, InvalidEngineError
from kiln.models.llama import LlamaForCausalLM
from kiln.models.parallel import TensorParallelGroup, read_shard, shard_config, shard_spec
from kiln.models.quant_linear import check_device_supports, check_kv_cache_supports
from kiln.models.upload import StagedUploader
from kiln.models.weight_files import hf_weight_files
from kiln.models.weights import expected_packed_shapes, pack_hf_state_dict
from kiln.progress import build_progress, counted


def load_model(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    tp: TensorParallelGroup | None = None,
    staged: bool = True,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load the model at `path` in eval mode on `device` (a progress bar on the console if `progress`).

    `path` is an engine directory (engine.json; packed weights listed in the manifest) or a Hugging
    Face directory (config.json + *.safetensors, one file or sharded with an index; packed on the
    fly). dtype None means the engine's dtype, or the checkpoint's `dtype`/`torch_dtype` (float32
    when it names none). A quantized engine (`quant_config`) keeps its int8/fp8 weights and float32
    scales whatever `dtype` says; `dtype` is then the activations' and the unquantized tensors'. An
    engine with an fp8 KV cache (`kv_cache_config`) gives a model holding its float32 KV scales, whose
    `kv_cache_dtype` is float8_e4m3fn. Raises CheckpointError / InvalidEngineError for unreadable input,
    and InvalidEngineError for a quantization or KV cache `device` cannot run
    (kiln.models.quant_linear.check_device_supports, check_kv_cache_supports).

    With `tp`, only that rank's shard is built and read (kiln.models.parallel): from an engine directory
    each tensor is sliced as safetensors reads it, so no rank ever holds a whole weight; a Hugging Face
    directory packs each fused tensor whole first, one at a time. The config returned is the whole
    model's. A quantized engine is refused with tensor parallelism (its scales are not sharded yet).

    On a CUDA device the tensors go through pinned staging buffers (kiln.models.upload); `staged=False`
    copies each one directly from pageable memory instead (same result, slower: for comparisons).
    """
    path = Path(path)
    quant: QuantConfig | None = None
    kv_cache: KVCacheConfig | None = None
    if (path / MANIFEST_NAME).is_file():
        manifest = EngineManifest.load(path)
        config = manifest.model
        quant = manifest.quant_config
        kv_cache = manifest.kv_cache_config
        if manifest.quantization is not None and quant is None:
            raise InvalidEngineError(
                f"{path}: {MANIFEST_NAME} says the weights are quantized {manifest.quantization!r} but not how "
                "(no quant_config); rebuild the engine"
            )
        check_device_supports(quant, device)
        check_kv_cache_supports(kv_cache, device)
        dtype = dtype or DTYPES[canonical_dtype(manifest.dtype)]
        if tp is not None and quant is not None:
            raise InvalidEngineError(
                f"{path}: tensor parallelism does not run quantized engines yet ({manifest.quantization}); "
                "serve it with tensor_parallel_size 1, or build it unquantized"
            )
        weights: Iterator[tuple[str, torch.Tensor]] = _read_safetensors(
            manifest.weight_paths(path), config, tp
        )
    else:
        hf_config = _read_hf_config(path)
        config = ModelConfig.from_hf(hf_config)
        dtype = dtype or _hf_dtype(hf_config)
        weights = pack_hf_state_dict(_read_safetensors(hf_weight_files(path)), config)
        if tp is not None:
            weights = _sharded(weights, config, tp)
    local = config if tp is None else shard_config(config, tp.world)
    model = build_empty_model(local, dtype=dtype, device=device, quant=quant, tp=tp, kv_cache=kv_cache)
    target = torch.device(device)
    uploader = StagedUploader(target) if staged and target.type == "cuda" else None
    with build_progress(enabled=progress) as bars:
        total = len(expected_packed_shapes(local, quant, kv_cache))
        advance = bars.step(f"loading weights ({device})", total=total)
        model.load_weights(counted(weights, advance), copy=None if uploader is None else uploader.copy)
    if uploader is not None:
        uploader.finish()
    return model.eval(), config


def read_model_config(path: Path) -> tuple[ModelConfig, QuantConfig | None]:
    """The model config of an engine directory or a Hugging Face directory, and a native engine's
    quantization layout (None otherwise), without reading a weight."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        manifest = EngineManifest.load(path)
        return manifest.model, manifest.quant_config
    return ModelConfig.from_hf(_read_hf_config(path)), None


def _sharded(
    weights: Iterator[tuple[str, torch.Tensor]], config: ModelConfig, tp: TensorParallelGroup
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        spec = shard_spec(name, config, tp.rank, tp.world)
        yield name, read_shard(spec, tuple(tensor.shape), tensor.__getitem__)


def build_empty_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    quant: QuantConfig | None = None,
    tp: TensorParallelGroup | None = None,
    kv_cache: KVCacheConfig | None = None,
) -> LlamaForCausalLM:
    """A LlamaForCausalLM with uninitialised parameters on `device`; fill it with load_weights.

    Floating-point parameters and buffers are `dtype`, except those a module fixes (its
    `storage_dtypes`: a quantized layer's int8/fp8 weight and float32 scale, an fp8 KV cache's float32
    k_scale / v_scale), which keep their own."""
    with torch.device("meta"), _SkipRandomInit():
        model = LlamaForCausalLM(config, quant=quant, tp=tp, kv_cache=kv_cache)
    if quant is None and kv_cache is None:
        # Casting on the meta device costs nothing; then each parameter is allocated once. Not `to_empty`:
        # its empty_like of a meta tensor runs a Python decomposition that imports sympy (~0.3 s).
        model = model.to(dtype=dtype)._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
        return model.requires_grad_(False)
    # `Module.to(dtype)` would cast the fp8 weights and the float32 scales too (both are floating
    # point): allocate each tensor once, module by module, in the dtype it is stored in.
    for module in model.modules():
        fixed: dict[str, torch.dtype] = getattr(module, "storage_dtypes", {})
        for name, param in list(module._parameters.items()):
            if param is not None:
                want = fixed.get(name, dtype if param.is_floating_point() else param.dtype)
                empty = torch.empty(param.shape, dtype=want, device=device)
                module._parameters[name] = torch.nn.Parameter(empty, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                want = dtype if buffer.is_floating_point() else buffer.dtype
                module._buffers[name] = torch.empty(buffer.shape, dtype=want, device=device)
    return model.requires_grad_(False)


class _SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Skips the modules' random init while a model is built on the meta device.

    There it computes nothing, but its Python decompositions import torch._dynamo and sympy: about
    1.5 s of every engine start on the CPU machine, for values load_weights overwrites anyway.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM_INITS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


_RANDOM_INITS = {
    torch.nn.init.normal_,
    torch.nn.init.uniform_,
    torch.nn.init.kaiming_uniform_,
    torch.nn.init.trunc_normal_,
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
}


def _read_safetensors(
    files: list[Path], config: ModelConfig | None = None, tp: TensorParallelGroup | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of `files` one at a time (on the CPU, in the file's dtype); with `tp`, only the
    rank's shard of each packed tensor of `config`, read slice by slice from the file."""
    from safetensors import safe_open

    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight file {file} does not exist")
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if tp is None or config is None:
                    yield name, reader.get_tensor(name)
                    continue
                view = reader.get_slice(name)
                spec = shard_spec(name, config, tp.rank, tp.world)
                yield name, read_shard(spec, tuple(view.get_shape()), view.__getitem__)


def _read_hf_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path} is neither an engine directory (engine.json) nor a checkpoint (config.json)"
        )
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc


def _hf_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    try:
        return DTYPES[canonical_dtype(str(name))]
    except ValueError as exc:
        raise CheckpointError(f"checkpoint dtype {name!r} is not one Kiln runs: {exc}") from exc
