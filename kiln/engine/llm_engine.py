"""`LLMEngine`: the synchronous engine. One `step()` = schedule, run the model, process outputs.

With overlapped steps (`EngineConfig.async_scheduling`, on by default on CUDA) a step schedules and
launches step N+1 on the GPU before it reads step N's tokens and turns them into outputs, so the
host's per-step work (scheduling, input preparation, detokenizing, stop checks) runs while the GPU
computes instead of between its steps. The price: a request that stops at step N has been scheduled
once more in step N+1, whose token is dropped. When a request in step N+1 samples with penalties or
a structured output's mask (both need step N's token on the host), only N+1's forward pass is queued
before step N is read; N+1's masks then fill in the background while step N's outputs are processed
and step N+2 is scheduled and prepared, and N+1's sampling is queued just before N+2's forward pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kiln.config import DTYPES, EngineConfig, EngineLimits, ModelConfig, canonical_dtype
from kiln.engine.info import BatchingLimits, EngineStats, ModelInfo, check_batching
from kiln.engine.memory_profile import num_kv_blocks_from_memory
from kiln.engine.model_runner import ForwardedStep, LaunchedStep, ModelRunner, RequestsFailed, SampledTokens
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.outputs import RequestOutput
from kiln.engine.piecewise_graphs import MAX_PIECEWISE_GRAPH_TOKENS
from kiln.engine.request import Request, RequestStatus
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kiln.engine.structured import Grammars
from kiln.engine.tp_workers import (
    AllocateKV,
    CaptureGraphs,
    SizeKV,
    TensorParallelWorkers,
    start_workers,
    tensor_parallel_size,
)
from kiln.engine.validation import validate_request
from kiln.engine_dir import EngineManifest, is_engine_dir
from kiln.kernels.compile_watch import compile_watch
from kiln.kernels.kernel_cache import prepare_engine_kernels
from kiln.kvcache.manager import KVCacheManager
from kiln.kvcache.tensors import allocate_kv_cache
from kiln.models.llama import LlamaForCausalLM
from kiln.models.loader import load_model
from kiln.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Rules: `add_request` validates and raises RequestValidationError (a ValueError) before anything is
    queued; `step` returns the deltas of every request that produced tokens; `abort_request` frees the
    request's blocks at once. `config` is the configuration resolved once, at construction."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        *,
        limits: EngineLimits | None = None,
        config: EngineConfig | None = None,
        model_name: str = "model",
        dtype: str = "float32",
        engine_dir: str | None = None,
        workers: TensorParallelWorkers | None = None,
    ) -> None:
        """Build the engine around a loaded model. Touches nothing outside it: the process's RNG seed and
        garbage collector are `kiln.engine.process_setup.prepare_process`'s job. With `workers` (tensor
        parallelism, see `from_path`) `model` is rank 0's shard and the workers mirror every step."""
        config = config or EngineConfig()
        if workers is None and (config.tensor_parallel_size or 1) > 1:
            raise ValueError(
                f"tensor_parallel_size {config.tensor_parallel_size} needs the engine loaded by "
                "LLMEngine.from_path, which starts the workers; this engine was built around a loaded model"
            )
        phase_start = time.perf_counter()
        # Seconds per start-up phase, logged once ready (from_path adds its loading phases first).
        self.startup_seconds: dict[str, float] = {}
        self.graph_capture_seconds: dict[str, float] = {}  # the cuda_graphs phase by graph family
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self._compiles = compile_watch() if self.device.type == "cuda" else None
        self.dtype = dtype
        self.workers = workers

        def size_kv_pool(block_size: int, max_tokens_per_step: int, max_num_seqs: int, cap: int) -> int:
            def local() -> int:
                return num_kv_blocks_from_memory(
                    model, config, block_size, max_tokens_per_step, max_num_seqs, cap=cap
                )

            if workers is None:
                return local()
            return workers.size_kv_pool(local, SizeKV(block_size, max_tokens_per_step, max_num_seqs, cap))

        kv_cache_dtype = "auto" if model.kv_cache is None else model.kv_cache.dtype
        self.config = config.resolve(
            limits or EngineLimits(), model_config, self.device, size_kv_pool, kv_cache_dtype
        )
        resolved = self.config
        self.max_model_len = resolved.max_model_len
        self.kv_cache = KVCacheManager(
            resolved.num_kv_blocks,
            resolved.block_size,
            enable_prefix_caching=resolved.enable_prefix_caching,
            hash_salt=model_name,
        )
        if workers is not None:
            workers.send(AllocateKV(resolved.num_kv_blocks, resolved.block_size))
        kv_tensors = allocate_kv_cache(  # model.config: this rank's KV heads; its KV dtype (fp8 or dtype)
            model.config, resolved.num_kv_blocks, resolved.block_size, model.kv_cache_dtype, self.device
        )
        self.startup_seconds["kv_cache"] = time.perf_counter() - phase_start
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=resolved.max_num_seqs,
                max_num_batched_tokens=resolved.max_num_batched_tokens,
                max_model_len=resolved.max_model_len,
                admission_interval=resolved.admission_interval,
            ),
            self.kv_cache,
        )
        self.runner = ModelRunner(
            model, kv_tensors, resolved.block_size, self.device, model_config.vocab_size
        )
        self.grammars = Grammars(tokenizer.hf)  # structured outputs' matchers, set up on first use
        self.runner.grammars = self.grammars
        if workers is not None:
            self.runner.on_step = workers.send
        if resolved.cuda_graphs:
            max_tokens_per_step = resolved.max_num_batched_tokens
            max_prefill = resolved.prefill_graph_tokens
            max_mixed = (
                min(MAX_PIECEWISE_GRAPH_TOKENS, max_tokens_per_step) if resolved.piecewise_graphs else 0
            )
            phase_start = time.perf_counter()
            if workers is not None:  # every rank captures the same graphs, in the same order
                workers.send(
                    CaptureGraphs(resolved.max_num_seqs, resolved.max_model_len, max_prefill, max_mixed)
                )
            self.graph_capture_seconds = self.runner.capture_graphs(
                resolved.max_num_seqs, resolved.max_model_len, max_prefill, max_mixed
            )
            self.startup_seconds["cuda_graphs"] = time.perf_counter() - phase_start
        self.outputs = OutputProcessor(tokenizer)
        eos = list(model_config.eos_token_ids) + list(tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        self.model_info = ModelInfo(
            name=model_name,
            backend="native",
            max_model_len=resolved.max_model_len,
            dtype=dtype,
            engine_dir=engine_dir,
            extra={
                "num_kv_blocks": resolved.num_kv_blocks,
                "block_size": resolved.block_size,
                "kv_cache_dtype": resolved.kv_cache_dtype,
                "device": str(self.device),
                "tensor_parallel_size": 1 if workers is None else workers.world,
            },
        )
        self._ids = itertools.count()
        self._batching_ceiling = BatchingLimits(None, resolved.max_num_batched_tokens, resolved.max_num_seqs)
        self._batching = self._current_batching()
        self._busy_seconds = self._backlog_seconds = 0.0
        self._backlog_prefill_tokens = 0
        self.async_scheduling = resolved.async_scheduling
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        # A step whose forward pass is queued and whose sampling is not (its masks are filling).
        self._forwarded: tuple[SchedulerOutput, ForwardedStep] | None = None
        self._failed: list[tuple[str, Exception]] = []

    @classmethod
    def from_path(cls, path: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        """Load an engine directory (engine.json) or a Hugging Face checkpoint directory. With a tensor-parallel
        size N > 1 (`config`, else the engine's), this process is rank 0 and starts N-1 workers
        (kiln.engine.tp_workers); on CUDA rank r runs on cuda:r."""
        config = config or EngineConfig()
        path = Path(path)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        limits: EngineLimits | None = None
        manifest: EngineManifest | None = None
        loading: dict[str, float] = {}
        name = config.served_model_name or path.name
        if is_engine_dir(path):
            manifest = EngineManifest.load(path)
            if manifest.backend != "native":
                raise ValueError(
                    f"{path} holds a {manifest.backend!r} engine; open it with kiln.clients.open"
                )
            # Before anything compiles: the engine's compiled kernels and tuned tiles (kiln tune), if any.
            phase_start = time.perf_counter()
            prepare_engine_kernels(path, device)
            loading["engine_kernels"] = time.perf_counter() - phase_start
            dtype = canonical_dtype(config.dtype or manifest.dtype)
            limits = manifest.limits
            name = config.served_model_name or manifest.served_model_name
        else:
            dtype = canonical_dtype(config.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
        world = tensor_parallel_size(config, manifest)
        workers = None
        phase_start = time.perf_counter()
        if world > 1:
            device = torch.device("cuda", 0) if device.type == "cuda" else device
            workers = start_workers(path, config, world, dtype, device)
        # The tokenizer (transformers' import, ~0.5-1.5 s, and its files) loads on a thread while the
        # weights stream to the device, mostly in calls that release the GIL.
        tokenizer_loader = ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenizer")
        tokenizer_future = tokenizer_loader.submit(Tokenizer, path)
        tokenizer_loader.shutdown(wait=False)
        try:
            model, model_config = load_model(
                path,
                dtype=DTYPES[dtype],
                device=device,
                progress=config.load_progress,
                tp=None if workers is None else workers.group,
            )
            if workers is not None:
                workers.wait_ready()
            loading["weights"] = time.perf_counter() - phase_start
            # What the tokenizer thread adds once the weights are in: zero unless it is the longer path.
            phase_start = time.perf_counter()
            tokenizer = tokenizer_future.result()
            loading["tokenizer_wait"] = time.perf_counter() - phase_start
            engine = cls(
                model,
                model_config,
                tokenizer,
                limits=limits,
                config=config,
                model_name=name,
                dtype=dtype,
                engine_dir=str(path),
                workers=workers,
            )
        except BaseException:
            if workers is not None:
                workers.close()
            raise
        engine.startup_seconds = loading | engine.startup_seconds
        logger.info(
            "engine ready; start-up seconds: %s",
            ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in engine.startup_seconds.items()),
        )
        if engine.graph_capture_seconds:
            logger.info(
                "CUDA graphs by family: %s",
                ", ".join(f"{name} {s:.2f}" for name, s in engine.graph_capture_seconds.items()),
            )
        return engine

    # -- requests ------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(
            prompt_token_ids,
            params,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
        )

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
        owner: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        self.validate(prompt_token_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        max_out = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_out = min(max_out, params.max_tokens)
        sequences: list[Request] = []
        for index in range(params.n):
            seq_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                # The samples share one prompt: the first scores it, the others take its cached blocks.
                prompt_logprobs = params.prompt_logprobs if index == 0 else None
                seq_params = dataclasses.replace(params, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
            sequences.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                    prompt_token_ids=list(prompt_token_ids),
                    params=seq_params,
                    eos_token_ids=self.eos_token_ids,
                    max_output_tokens=max_out,
                    arrival_time=arrival,
                    priority=priority,
                    owner=owner,
                    group_id=request_id,
                    index=index,
                    wait_for=sequences[0] if index else None,
                    # One matcher per sequence; a grammar llguidance cannot enforce is refused here.
                    matcher=None if params.structured is None else self.grammars.matcher(params.structured),
                )
            )
        self.outputs.add(request_id, prompt, sequences)
        for seq in sequences:
            self.scheduler.add_request(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Abort a caller request (all its n sequences); blocks are back in the pool when this returns."""
        self.scheduler.finish_requests(self.outputs.remove(request_id), RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_unfinished_requests()
            or self._in_flight is not None
            or self._forwarded is not None
        )

    # -- batching limits -----------------------------------------------------------------------------
    def set_batching(self, limits: BatchingLimits) -> None:
        """Change the scheduler's batching limits from the next step on (None: unchanged). Every limit is
        at least 1, and the token budget and running-sequence cap at most what the engine was configured
        with: its CUDA graphs, KV pool and buffers were sized for those, and any smaller step fits them
        (a graph bucket holds any batch up to its size). Raises ValueError, changing nothing, otherwise."""
        check_batching(limits, self._batching_ceiling)
        config = self.scheduler.config
        if limits.admission_interval is not None:
            config.admission_interval = limits.admission_interval
        if limits.max_num_batched_tokens is not None:
            config.max_num_batched_tokens = limits.max_num_batched_tokens
        if limits.max_num_seqs is not None:
            config.max_num_seqs = limits.max_num_seqs
        self._batching = self._current_batching()

    def _current_batching(self) -> BatchingLimits:
        config = self.scheduler.config
        return BatchingLimits(config.admission_interval, config.max_num_batched_tokens, config.max_num_seqs)

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the step whose tokens reached the host (with
        overlapped steps, the one launched by the previous call). Its wall time counts as busy, and as
        backlog when requests still wait after its scheduling (see `EngineStats`). With tensor parallelism a
        worker that died makes every step raise EngineDeadError naming its rank: the engine is dead."""
        began = time.perf_counter()
        if self.workers is not None:
            self.workers.check()
        scheduled = self.scheduler.schedule()
        try:
            outputs = self._step(scheduled)
        except Exception:
            self.runner.settle_masks()  # a background mask fill must end before the matchers move again
            if self.workers is not None:  # a collective failed: most likely a rank died (it names it)
                self.workers.check(wait=2.0)
            raise
        seconds = time.perf_counter() - began
        self._busy_seconds += seconds
        if self.scheduler.waiting:
            self._backlog_seconds += seconds
            self._backlog_prefill_tokens += sum(
                item.num_new_tokens
                for item in scheduled.scheduled
                if item.num_new_tokens > 1 or item.start < item.request.num_prompt_tokens
            )
        return outputs

    def _step(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        if not self.async_scheduling:
            return self._finish_step(*self._launch(scheduled))
        host = None
        if self._forwarded is not None:
            # The last step's forward pass is queued and its sampling waits for its masks: prepare this
            # step's inputs on the host while they fill, then queue that sampling, then this step.
            last, forwarded = self._forwarded
            self._forwarded = None
            if not scheduled.is_empty:
                host = self.runner.host_inputs(scheduled, after=forwarded)
            self._in_flight = self._launch(last, forwarded)
            if self._in_flight[1].sample_ids != forwarded.inputs.sample_ids:  # a request failed in it
                scheduled, host = self._without_finished(scheduled), None
        outputs: list[RequestOutput] = []
        if scheduled.is_empty:
            launched = None
        elif self._in_flight is not None and self._needs_host_tokens(scheduled):
            # Its sampling reads the tokens in flight: queue the forward pass, read them while it runs,
            # begin the step's masks and process the outputs; the next step queues the sampling.
            forwarded = self.runner.launch_forward_host(host or self.runner.host_inputs(scheduled))
            advanced, sampled = self._collect_step(*self._in_flight)
            self._in_flight = None
            self.runner.start_masks(scheduled)
            self._forwarded = (scheduled, forwarded)
            return self._process_outputs(advanced, sampled)
        else:
            launched = self._launch(
                scheduled, None if host is None else self.runner.launch_forward_host(host)
            )
        if self._in_flight is not None:
            outputs = self._finish_step(*self._in_flight)
        self._in_flight = launched
        return outputs

    def check_alive(self) -> None:
        """Raise EngineDeadError naming a tensor-parallel rank that died; the step loop asks between steps,
        so an idle engine notices too."""
        if self.workers is not None:
            self.workers.check()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when this process exits)."""
        if self.workers is not None:
            self.workers.close()

    def take_failed(self) -> list[tuple[str, Exception]]:
        """The caller requests the engine gave up on since the last call, with why: each failed in its
        own part of a step (see `_launch`) and was aborted; the requests beside it went on."""
        failed, self._failed = self._failed, []
        return failed

    def _launch(
        self, scheduled: SchedulerOutput, forwarded: ForwardedStep | None = None
    ) -> tuple[SchedulerOutput, LaunchedStep]:
        """Launch the step (its sampling only, when `forwarded`); a request whose own part of it fails
        is aborted and the whole step launched again without it, so one request's fault never ends its
        neighbours'."""
        while True:
            try:
                return scheduled, self.runner.launch(scheduled, forwarded)
            except RequestsFailed as failed:
                forwarded = None
                by_caller = {self.scheduler.requests[s].group_id or s: e for s, e in failed.errors.items()}
                aborted = [
                    seq_id for rid, error in by_caller.items() for seq_id in self._fail_request(rid, error)
                ]
                scheduled = self._without_finished(scheduled, aborted)

    @staticmethod
    def _without_finished(
        scheduled: SchedulerOutput, finished_ids: list[str] | None = None
    ) -> SchedulerOutput:
        """`scheduled` without the requests that finished since (aborted: `finished_ids` added)."""
        kept = tuple(item for item in scheduled.scheduled if not item.request.status.finished)
        return dataclasses.replace(
            scheduled,
            scheduled=kept,
            finished_ids=(*scheduled.finished_ids, *(finished_ids or ())),
            num_batched_tokens=sum(item.num_new_tokens for item in kept),
        )

    def _fail_request(self, request_id: str, error: Exception) -> list[str]:
        """Abort a caller request that failed in the engine and record why; returns its sequences' ids."""
        logger.warning("request %s failed in the engine and was aborted: %r", request_id, error)
        seq_ids = self.outputs.remove(request_id)
        self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        self._failed.append((request_id, error))
        return seq_ids

    def _advance_matchers(self, advanced: list[Request]) -> None:
        """Feed each structured request its new token; one whose grammar is complete stops there."""
        for request in advanced:
            matcher = request.matcher
            if matcher is None or request.status.finished:
                continue
            if not matcher.consume_token(request.output_token_ids[-1]):  # the mask allowed it: a fault
                self._fail_request(request.group_id or request.request_id, RuntimeError(matcher.get_error()))
            elif matcher.is_stopped():
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)

    def _finish_step(self, scheduled: SchedulerOutput, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and turn them into outputs."""
        return self._process_outputs(*self._collect_step(scheduled, launched))

    def _collect_step(
        self, scheduled: SchedulerOutput, launched: LaunchedStep
    ) -> tuple[list[Request], SampledTokens]:
        """Wait for a launched step's tokens, append them to their requests and advance their matchers;
        returns the requests that advanced and the tokens."""
        sampled = self.runner.collect(launched)
        advanced = self.scheduler.update(scheduled, sampled.token_ids)
        self._advance_matchers(advanced)
        return advanced, sampled

    def _process_outputs(self, advanced: list[Request], sampled: SampledTokens) -> list[RequestOutput]:
        """Turn collected tokens into outputs (detokenized deltas, stop checks)."""
        outputs, stopped, failed = self.outputs.process(advanced, sampled)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for request_id, error in failed.items():
            self._fail_request(request_id, error)
        return outputs

    @staticmethod
    def _needs_host_tokens(scheduled: SchedulerOutput) -> bool:
        """Whether a request sampling in `scheduled` needs an earlier token still in flight (the
        count includes the one this step samples)."""
        return any(
            item.sample and item.request.num_pending_tokens > 1 and item.request.params.needs_output_ids
            for item in scheduled.scheduled
        )

    def stats(self) -> EngineStats:
        kv = self.kv_cache.stats()
        waiting = self.scheduler.waiting
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(waiting),
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in waiting),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.scheduler.num_steps,
            num_step_seqs=self.scheduler.num_step_seqs,
            num_step_tokens=self.scheduler.num_step_tokens,
            busy_seconds=self._busy_seconds,
            backlog_seconds=self._backlog_seconds,
            backlog_prefill_tokens=self._backlog_prefill_tokens,
            kernel_compiles=0 if self._compiles is None else self._compiles.count,
            kernel_compile_seconds=0.0 if self._compiles is None else self._compiles.seconds,
            batching=self._batching,
            batching_ceiling=self._batching_ceiling,
        )
