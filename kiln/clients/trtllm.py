"""`TrtLlmEngine`: Kiln's `EngineClient` over tensorrt_llm 1.2's TensorRT-engine `LLM`.

Rules:
- Requests stream through `LLM.generate_async(token_ids, sampling_params, streaming=True)`; every
  library RequestOutput carries per-step diffs (`outputs[i].text_diff`, `token_ids_diff`, `logprobs_diff`,
  tensorrt_llm/executor/result.py CompletionOutput), which `OutputTranslator` turns into Kiln deltas.
- Parameters the engine cannot honour raise RequestValidationError naming the Kiln field before anything is queued
  (see kiln.trtllm.params). Closing the stream early calls the library result's `abort()`.
- Runtime knobs (KV cache memory fraction, size, block reuse, batch/token caps, context length) come
  from EngineConfig and may only lower what the engine was built for (`runtime_llm_kwargs`).
- `stats()` is a snapshot refreshed by a background task reading `LLM.get_stats_async()` (iteration
  stats dicts: numActiveRequests, numQueuedRequests, kvCacheStats{maxNumBlocks, usedNumBlocks, ...}).
- Request priority and owner are not passed on: the TensorRT-LLM scheduler serves requests in arrival
  order, without Kiln's fair share between owners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kiln.clients.messages import EngineDeadError
from kiln.config import EngineConfig
from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.engine_dir import EngineManifest
from kiln.errors import InvalidEngineError, RequestValidationError
from kiln.models.tokenizer import Tokenizer
from kiln.trtllm import compat
from kiln.trtllm.outputs import OutputTranslator, engine_stats_from_trtllm
from kiln.trtllm.params import TrtLlmRequestLimits, make_trtllm_sampling_params, trtllm_sampling_kwargs

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# EngineConfig knobs of the native engine's scheduling and CUDA graphs, which TensorRT-LLM has no use for.
NATIVE_ONLY_KNOBS = (
    "enforce_eager",
    "piecewise_graphs",
    "prefill_graph_tokens",
    "async_scheduling",
    "admission_interval",
)


def runtime_llm_kwargs(manifest: Any, options: EngineConfig) -> dict[str, Any]:
    """`LLM(...)` keywords for serving `manifest`'s engine with `options`; ValueError for what it cannot do.

    Returns {"kv_cache_config": {KvCacheConfig keywords}, "max_batch_size", "max_num_tokens", "max_seq_len",
    "tensor_parallel_size", "enable_chunked_prefill", "gather_generation_logits"}.
    EngineConfig.gpu_memory_utilization becomes KvCacheConfig.free_gpu_memory_fraction: the share of GPU
    memory *left after loading the engine* that the KV cache takes (TensorRT-LLM's meaning), which is close
    to but not the native engine's meaning.
    """
    limits = manifest.limits
    extra = manifest.extra
    built_seq_len = int(
        extra.get("build_config", {}).get("max_seq_len") or limits.resolved_max_seq_len(manifest.model)
    )

    def capped(option: str, value: int | None, built: int) -> int:
        if value is not None and value > built:
            raise ValueError(
                f"{option} {value} exceeds the {built} this TensorRT engine was built for; rebuild it"
            )
        return value or built

    if options.dtype is not None and options.dtype != manifest.dtype:
        raise ValueError(f"dtype {options.dtype!r}: this TensorRT engine was compiled for {manifest.dtype}")
    if options.device not in (None, "cuda") and not str(options.device).startswith("cuda"):
        raise ValueError(f"device {options.device!r}: TensorRT-LLM engines run on CUDA GPUs only")
    if options.block_size not in (None, limits.block_size):
        raise ValueError(
            f"block_size {options.block_size}: this engine's KV blocks hold {limits.block_size} tokens"
        )
    for knob in NATIVE_ONLY_KNOBS:  # set away from its default, it would be silently ignored here
        value = getattr(options, knob)
        if value != EngineConfig.__dataclass_fields__[knob].default:
            flag = "--" + knob.replace("_", "-")
            raise ValueError(
                f"{flag} ({value!r}) applies to the native engine only, not to a TensorRT engine"
            )
    if not 0.0 < options.gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {options.gpu_memory_utilization}")

    kv: dict[str, Any] = {
        "free_gpu_memory_fraction": options.gpu_memory_utilization,
        "enable_block_reuse": options.enable_prefix_caching,
    }
    model = manifest.model
    tp = int(extra.get("tp_size", 1))
    if options.tensor_parallel_size not in (None, tp):
        raise ValueError(
            f"tensor_parallel_size {options.tensor_parallel_size}: this TensorRT engine was built for {tp} "
            "GPU(s); rebuild it with --tp-size"
        )
    if options.num_kv_blocks is not None:
        kv["max_tokens"] = options.num_kv_blocks * limits.block_size
    elif options.kv_cache_memory_bytes is not None:
        per_token = 2 * model.num_hidden_layers * model.kv_size * _DTYPE_BYTES[manifest.dtype] / tp
        kv["max_tokens"] = int(options.kv_cache_memory_bytes // per_token)
    return {
        "kv_cache_config": kv,
        "max_batch_size": capped("max_num_seqs", options.max_num_seqs, limits.max_batch_size),
        "max_num_tokens": capped(
            "max_num_batched_tokens", options.max_num_batched_tokens, limits.max_num_tokens
        ),
        "max_seq_len": capped("max_model_len", options.max_model_len, built_seq_len),
        "tensor_parallel_size": tp,  # must match the engine's mapping: one rank<N>.engine per GPU
        "enable_chunked_prefill": True,  # the engine is built with paged context FMHA, which allows it
        "gather_generation_logits": bool(extra.get("gather_generation_logits", False)),
    }


class TrtLlmEngine:
    """EngineClient over a loaded tensorrt_llm TensorRT-engine `LLM` (built by `from_engine_dir`)."""

    def __init__(
        self,
        llm: Any,
        manifest: Any,
        *,
        engine_dir: Path,
        options: EngineConfig,
        sampling_params_cls: Any,
        runtime: dict[str, Any],
        tokenizer: Any = None,
    ) -> None:
        self._llm = llm
        self._shut_down = False
        self._manifest = manifest
        self._engine_dir = Path(engine_dir)
        self._sampling_params_cls = sampling_params_cls
        self._tokenizer = tokenizer
        eos = list(manifest.model.eos_token_ids)
        self._limits = TrtLlmRequestLimits(
            max_seq_len=runtime["max_seq_len"],
            max_batch_size=runtime["max_batch_size"],
            vocab_size=manifest.model.vocab_size,
            eos_token_ids=eos,
            gather_generation_logits=runtime["gather_generation_logits"],
        )
        self._model_info = ModelInfo(
            name=options.served_model_name or manifest.served_model_name,
            backend="trtllm",
            max_model_len=runtime["max_seq_len"],
            dtype=manifest.dtype,
            engine_dir=str(engine_dir),
            extra={
                "tensorrt_llm_version": manifest.extra.get("tensorrt_llm_version"),
                "quantization": manifest.quantization,
                "kv_cache_dtype": manifest.kv_cache_dtype,
                "tp_size": manifest.extra.get("tp_size", 1),
                "kv_cache": runtime["kv_cache_config"],
            },
        )
        self._rng = random.Random(options.seed)  # seeds for requests that bring none
        self._requests: dict[str, Any] = {}
        self._stats = EngineStats()
        self._stats_task: asyncio.Task[None] | None = None
        self.stats_interval_s = 1.0

    @classmethod
    def from_engine_dir(cls, path: str | Path, options: EngineConfig | None = None) -> TrtLlmEngine:
        """Load an engine directory built by `kiln build --backend trtllm`.

        Raises InvalidEngineError for a non-trtllm directory or one built for another tensorrt_llm version
        or GPU, BackendUnavailableError when tensorrt_llm or a GPU is missing, ValueError for options the
        engine cannot honour.
        """
        options = options or EngineConfig()
        path = Path(path)
        manifest = EngineManifest.load(path)
        if manifest.backend != "trtllm":
            raise InvalidEngineError(f"{path} holds a {manifest.backend!r} engine, not a TensorRT-LLM one")
        runtime = runtime_llm_kwargs(manifest, options)
        trtllm = compat.import_tensorrt_llm()
        compat.check_engine_compatible(
            manifest.extra, runtime_version=str(trtllm.__version__), gpu=compat.probe_gpu()
        )
        from tensorrt_llm.llmapi import KvCacheConfig  # deferred: tensorrt_llm is optional

        LLM = compat.import_trt_engine_llm()
        # max_seq_len stays Kiln's to enforce: TrtLlmArgs resets a runtime max_seq_len to the engine's
        # (llmapi/llm_args.py validate_build_config_with_runtime_params); batch and token caps may be lower.
        kwargs = {k: v for k, v in runtime.items() if k not in ("kv_cache_config", "max_seq_len")}
        llm = LLM(
            model=str(path / manifest.extra.get("engine_subdir", "trtllm")),
            tokenizer=str(path),
            kv_cache_config=KvCacheConfig(**runtime["kv_cache_config"]),
            **kwargs,
        )
        return cls(
            llm,
            manifest,
            engine_dir=path,
            options=options,
            sampling_params_cls=trtllm.SamplingParams,
            runtime=runtime,
        )

    # -- EngineClient -------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._engine_dir)
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    def stats(self) -> EngineStats:
        if not self._requests:  # the library reports nothing while idle; do not show stale load
            self._stats.num_running = self._stats.num_waiting = 0
        return self._stats

    async def start(self) -> None:
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.create_task(self._poll_stats(), name="kiln-trtllm-stats")

    async def check_health(self, timeout: float) -> None:
        """Only a shut-down engine is seen as dead: tensorrt_llm 1.2's LLM gives no liveness probe of
        its executor workers that Kiln relies on."""
        if self._shut_down:
            raise EngineDeadError("the TensorRT-LLM engine was shut down")

    async def shutdown(self) -> None:
        self._shut_down = True
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
            self._stats_task = None
        for request_id in list(self._requests):
            await self.abort(request_id)
        await asyncio.to_thread(self._llm.shutdown)

    async def abort(self, request_id: str) -> None:
        result = self._requests.pop(request_id, None)
        if result is not None:
            result.abort()

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
        owner: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        sampling_params = self._prepare(prompt_token_ids, params, request_id)  # raises before queueing
        await self.start()
        result = self._llm.generate_async(
            list(prompt_token_ids), sampling_params=sampling_params, streaming=True
        )
        self._requests[request_id] = result
        translator = OutputTranslator(
            request_id,
            prompt,
            prompt_token_ids,
            logprobs=params.logprobs,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            eos_token_ids=self._limits.eos_token_ids,
            user_stop_token_ids=params.stop_token_ids,
        )
        library_done = False
        try:
            async for out in result:
                library_done = bool(out.finished)
                delta = translator.step(out)
                if delta is None:
                    continue
                yield delta
                if delta.finished:
                    return
        finally:
            # Client gone, task cancelled, failed, or finished by a stop string the library does not know:
            # free the sequence's KV blocks now (unless abort() already did).
            if self._requests.pop(request_id, None) is not None and not library_done:
                result.abort()

    # -- internals ------------------------------------------------------------------------------------
    def _prepare(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> Any:
        if not prompt_token_ids:
            raise RequestValidationError("the prompt is empty: give at least one token", "prompt")
        vocab = self._limits.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestValidationError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}", "prompt")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        kwargs = trtllm_sampling_kwargs(
            params,
            prompt_len=len(prompt_token_ids),
            limits=self._limits,
            fallback_seed=self._rng.getrandbits(63),
        )
        return make_trtllm_sampling_params(self._sampling_params_cls, kwargs, vocab_size=vocab)

    async def _poll_stats(self) -> None:
        while True:
            try:
                async for stat in self._llm.get_stats_async(timeout=self.stats_interval_s):
                    self._stats = engine_stats_from_trtllm(stat)
            except asyncio.CancelledError:
                raise
            except Exception:  # stats are best effort; never take the engine down for them
                logger.debug("reading TensorRT-LLM stats failed", exc_info=True)
            await asyncio.sleep(self.stats_interval_s)


__all__ = ["TrtLlmEngine", "runtime_llm_kwargs"]
