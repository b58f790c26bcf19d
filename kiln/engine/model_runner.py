"""`ModelRunner`: the one place a `SchedulerOutput` becomes tensors, a forward pass and sampled tokens.

A step is `launch` then `collect`. `launch` queues the whole step on the device (inputs, forward,
sampling, and the copy of the sampled tokens to pinned host memory) and returns without waiting;
`collect` waits for that copy. Between the two the host may schedule and launch the next step: a
decode whose input token was sampled by the step before it and is not on the host yet reads it
straight from that step's device tensor. Rules: only the most recently launched step's tokens can
be read that way, and steps must be collected in launch order.

A step whose sampling needs the previous step's tokens on the host (penalties, a structured output's
mask) is launched in two halves: `launch_forward` queues its forward pass, the caller collects the
previous step while it runs, then `launch(output, forwarded)` queues the sampling. In between, the
caller may `start_masks` so the step's token masks fill in the background, and prepare the next step's
host inputs (`host_inputs(next, after=forwarded)`) before it queues that sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln import kernels
from kiln.engine.cuda_graphs import BucketedGraphs, DecodeLayout, PrefillLayout
from kiln.engine.host_transfer import HostStaging, to_host
from kiln.engine.piecewise_graphs import PiecewiseGraphs
from kiln.engine.prompt_logprobs import PromptRows, PromptScores, prompt_rows, score
from kiln.engine.sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRow, make_generator
from kiln.engine.scheduler import ScheduledRequest, SchedulerOutput
from kiln.engine.structured import Grammars, MaskFill
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM

_NO_GENERATOR_YET = object()  # a request's first sampling makes its generator (None: unseeded)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from (last token of sampling requests)
    sample_ids: list[str]  # request ids, one per logits row
    prompt: PromptRows | None = None  # prompt tokens this step scores (SamplingParams.prompt_logprobs)


@dataclass(slots=True)
class HostStep:
    """A step's inputs as host lists, before they go to the device: what a tensor-parallel rank 0 sends
    its workers (kiln.engine.tp_workers), so every rank builds the same tensors."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    logits_indices: list[int]
    query_start: list[int]
    seq_lens: list[int]
    block_rows: list[int]
    gather_to: list[int]  # decodes whose input token is still on the device (rank 0's last step)
    gather_from: list[int]
    max_blocks: int
    max_query_len: int
    sample_ids: list[str]
    prompt: PromptRows | None = None


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device; `ModelRunner.collect` turns it into `SampledTokens`."""

    sample_ids: list[str]  # request ids, one per sampled row
    output: SamplerOutput | None  # host tensors (pinned on CUDA) being filled by non-blocking copies
    done: torch.cuda.Event | None  # recorded after those copies (CUDA only)
    prompt: PromptScores | None = None  # host copies, like `output`


@dataclass(slots=True)
class ForwardedStep:
    """A step whose forward pass is queued and whose sampling is not (`ModelRunner.launch_forward`)."""

    inputs: StepInputs
    logits: torch.Tensor | None  # [sampling rows, vocab] on the device; None: no row samples
    prompt: PromptScores | None = None  # on the device


@dataclass(slots=True)
class SampledTokens:
    """Host-side result of one step: the sampled token and its logprobs per request id."""

    token_ids: dict[str, int]
    output: SamplerOutput | None
    row_of: dict[str, int]  # request id -> row in `output`
    prompt: PromptScores | None = None  # the prompt tokens the step scored


class RequestsFailed(Exception):
    """The per-request part of a step failed for these sequences (id -> error), before anything was
    launched: the caller drops them and launches the step again for the rest."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        super().__init__(f"{len(errors)} request(s) failed to prepare: {sorted(errors)}")
        self.errors = errors


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        vocab_size: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.sampler = Sampler()
        self.graphs: BucketedGraphs | None = None  # decode graphs, set by capture_graphs on CUDA
        # Decode graphs for shorter contexts, shortest first, where attention's tile depends on length.
        self.short_graphs: list[BucketedGraphs] = []
        self.prefill_graphs: BucketedGraphs | None = None
        self.piecewise_graphs: PiecewiseGraphs | None = None
        self._staging = HostStaging(device)
        # The last launched step's sampled tokens, on the device, and the row of each request in them:
        # the next step's decodes read their input token from there when its id is not on the host yet.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        # Seeded requests keep their own RNG across steps (and across preemption), so their samples do not
        # depend on what else is in the batch.
        self._generators: dict[str, torch.Generator | None] = {}
        # Structured outputs: the engine's matchers (set by LLMEngine) and the host buffers of their masks.
        self.grammars: Grammars | None = None
        self._masks: list[torch.Tensor | None] = [None, None]
        self._mask_turn = 0
        # Masks begun by `start_masks` for the sampling rows of these request ids.
        self._pending_masks: tuple[tuple[str, ...], MaskFill] | None = None
        # Tensor parallelism: rank 0 hands each step's host inputs to its workers before running it.
        self.on_step: Callable[[HostStep], None] | None = None

    @torch.inference_mode()
    def launch(self, output: SchedulerOutput, forwarded: ForwardedStep | None = None) -> LaunchedStep:
        """Queue the step on the device; returns as soon as it is queued (on CUDA). `forwarded`: the
        step's forward pass, queued earlier by `launch_forward`; only its sampling is left to queue."""
        for request_id in output.finished_ids:
            self._generators.pop(request_id, None)
        pending = self.settle_masks()
        if output.is_empty:
            return LaunchedStep(sample_ids=[], output=None, done=None)
        # Per-request work first, where a failure is one request's (and, without `forwarded`, nothing
        # is on the device yet).
        rows: list[SamplingRow] = []
        failed: dict[str, Exception] = {}
        for item in output.scheduled:
            if item.sample:
                try:
                    rows.append(self._sampling_row(item))
                except Exception as exc:
                    failed[item.request.request_id] = exc
        if failed:
            raise RequestsFailed(failed)
        if forwarded is None:
            forwarded = self.launch_forward(output)
        inputs, logits = forwarded.inputs, forwarded.logits
        prompt = None if forwarded.prompt is None else forwarded.prompt.to_host()
        if logits is None:
            done = None if prompt is None else self._copied()  # nothing to wait for otherwise
            return LaunchedStep(sample_ids=[], output=None, done=done, prompt=prompt)
        batch = SamplingBatch.build(rows, self.vocab_size, self.device)
        if self.grammars is not None and any(row.matcher is not None for row in rows):
            # On CUDA the forward pass runs while the host fills the masks.
            if pending is not None and pending[0] == tuple(inputs.sample_ids):
                mask = pending[1]  # a row whose request finished since samples as masked: dropped
            else:
                mask = self._mask_staging(len(rows))
                self.grammars.fill_masks([row.matcher for row in rows], mask)
            batch.token_mask = mask.to(self.device, non_blocking=True)
        sampled = self.sampler(logits, batch)
        self._last_tokens = sampled.token_ids
        self._last_rows = {rid: i for i, rid in enumerate(inputs.sample_ids)}
        # One copy per tensor to host memory for the whole step (never one per request), queued now.
        host = SamplerOutput(
            **{
                name: None if tensor is None else to_host(tensor)
                for name, tensor in (
                    ("token_ids", sampled.token_ids),
                    ("logprobs", sampled.logprobs),
                    ("topk_token_ids", sampled.topk_token_ids),
                    ("topk_logprobs", sampled.topk_logprobs),
                    ("ranks", sampled.ranks),
                )
            }
        )
        return LaunchedStep(sample_ids=inputs.sample_ids, output=host, done=self._copied(), prompt=prompt)

    def _copied(self) -> torch.cuda.Event | None:
        """An event after the copies queued so far (CUDA only)."""
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def start_masks(self, output: SchedulerOutput) -> None:
        """Begin filling the token masks of `output`'s sampling rows from their matchers as they are now;
        the next `launch` takes them if its rows are the same. Nothing when no row is held by a structured
        output. Until they are taken (or `settle_masks`), the matchers must not advance."""
        self.settle_masks()
        items = [item for item in output.scheduled if item.sample]
        matchers = [None if i.request.status.finished else i.request.matcher for i in items]
        if self.grammars is None or all(m is None for m in matchers):
            return
        fill = self.grammars.start_fill(matchers, self._mask_staging(len(items)))
        self._pending_masks = (tuple(i.request.request_id for i in items), fill)

    def settle_masks(self) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """Wait for the masks `start_masks` began, if any, and forget them; returns their rows' request ids
        and the masks."""
        pending, self._pending_masks = self._pending_masks, None
        if pending is None:
            return None
        return pending[0], pending[1].wait()

    @torch.inference_mode()
    def launch_forward(self, output: SchedulerOutput) -> ForwardedStep:
        """Queue a non-empty step's inputs and forward pass, up to the logits of its sampling rows."""
        return self._forward_logits(self.prepare_inputs(output))

    def forward_host(self, host: HostStep) -> ForwardedStep:
        """The forward pass of a step's host inputs, up to the logits of its sampling rows: what a
        tensor-parallel worker runs for rank 0's step, so its collectives meet rank 0's."""
        return self._forward_logits(self.device_inputs(host))

    def _forward_logits(self, inputs: StepInputs) -> ForwardedStep:
        hidden = self._forward(inputs)
        logits = self.model.compute_logits(hidden[inputs.logits_indices]) if inputs.sample_ids else None
        prompt = None
        if inputs.prompt is not None:
            rows, targets = (
                torch.tensor(part, dtype=torch.int64).to(self.device, non_blocking=True)
                for part in (inputs.prompt.rows, inputs.prompt.targets)
            )
            prompt = score(
                self.model.compute_logits, hidden, rows, targets, inputs.prompt.spans, inputs.prompt.top
            )
        return ForwardedStep(inputs=inputs, logits=logits, prompt=prompt)

    def collect(self, step: LaunchedStep) -> SampledTokens:
        """Wait for a launched step's tokens (and logprobs) to reach the host."""
        if step.done is not None:
            step.done.synchronize()
        if step.output is None:
            return SampledTokens(token_ids={}, output=None, row_of={}, prompt=step.prompt)
        token_ids = step.output.token_ids.tolist()
        return SampledTokens(
            token_ids=dict(zip(step.sample_ids, token_ids, strict=True)),
            output=step.output,
            row_of={rid: i for i, rid in enumerate(step.sample_ids)},
            prompt=step.prompt,
        )

    def capture_graphs(
        self, max_batch_size: int, max_model_len: int, max_prefill_tokens: int, max_mixed_tokens: int = 0
    ) -> dict[str, float]:
        """Decode graphs up to max_batch_size requests, a family per context-length class where
        attention's decode tile depends on the length (`kernels.decode_context_bounds`); when
        max_prefill_tokens > 1, single-request prefill graphs up to that many tokens; when
        max_mixed_tokens > 0, piecewise graphs for any step up to that many tokens. All in one memory
        pool. Returns each family's capture seconds."""
        pool = torch.cuda.graph_pool_handle()
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        if max_mixed_tokens > 0:
            self.piecewise_graphs = PiecewiseGraphs(
                self.model, self.kv_caches, max_tokens=max_mixed_tokens, device=self.device
            )
            self.piecewise_graphs.capture(pool)
            seconds["piecewise"], start = time.perf_counter() - start, time.perf_counter()
        shapes = {"max_model_len": max_model_len, "block_size": self.block_size, "device": self.device}
        if max_prefill_tokens > 1:
            prefill = PrefillLayout(max_tokens=max_prefill_tokens, **shapes)
            self.prefill_graphs = BucketedGraphs(self.model, self.kv_caches, prefill)
            self.prefill_graphs.capture(pool)
            seconds["prefill"], start = time.perf_counter() - start, time.perf_counter()
        decode = DecodeLayout(max_batch_size=max_batch_size, **shapes)
        self.graphs = BucketedGraphs(self.model, self.kv_caches, decode)
        self.graphs.capture(pool)
        for bound in kernels.decode_context_bounds(self.kv_caches[0][0]):
            if bound < max_model_len:
                layout = DecodeLayout(max_batch_size=max_batch_size, max_seq_len=bound, **shapes)
                self.short_graphs.append(BucketedGraphs(self.model, self.kv_caches, layout))
                self.short_graphs[-1].capture(pool)
        seconds["decode"] = time.perf_counter() - start
        return seconds

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.metadata
        if self.graphs is not None and meta.is_pure_decode:
            for graphs in (*self.short_graphs, self.graphs):
                if graphs.layout.covers(meta) and graphs.bucket_for(meta.num_seqs):
                    return graphs.run(inputs.input_ids, inputs.positions, meta)
        num_tokens = inputs.input_ids.shape[0]
        if (
            self.prefill_graphs is not None
            and meta.num_seqs == 1
            and self.prefill_graphs.bucket_for(num_tokens)
        ):
            return self.prefill_graphs.run(inputs.input_ids, inputs.positions, meta)
        if self.piecewise_graphs is not None and self.piecewise_graphs.bucket_for(num_tokens):
            return self.piecewise_graphs.run(inputs.input_ids, inputs.positions, meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)

    def prepare_inputs(self, output: SchedulerOutput) -> StepInputs:
        """The step's tensors on the device; with tensor parallelism its host inputs go to the workers
        first (`on_step`)."""
        return self.send_inputs(self.host_inputs(output))

    def send_inputs(self, host: HostStep) -> StepInputs:
        """Host inputs to the device (and first, with tensor parallelism, to the workers)."""
        if self.on_step is not None:
            self.on_step(host)
        return self.device_inputs(host)

    @torch.inference_mode()
    def launch_forward_host(self, host: HostStep) -> ForwardedStep:
        """`launch_forward` of host inputs prepared earlier (`host_inputs`)."""
        return self._forward_logits(self.send_inputs(host))

    def host_inputs(self, output: SchedulerOutput, after: ForwardedStep | None = None) -> HostStep:
        """The step's inputs as host lists. `after`: a forwarded step whose sampling will be launched
        before these inputs reach the device; a decode whose input token it samples reads it from there
        (by default, from the last launched step)."""
        last_rows = (
            self._last_rows if after is None else {r: i for i, r in enumerate(after.inputs.sample_ids)}
        )
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        sample_ids: list[str] = []
        max_blocks = max(len(item.block_ids) for item in output.scheduled)
        block_rows: list[int] = []
        # Decodes whose input token the last launched step sampled and the host has not read yet.
        gather_to: list[int] = []  # index in this step's input_ids
        gather_from: list[int] = []  # row in self._last_tokens
        scoring: list[tuple[str, list[int], int, int, int, int]] = []  # prompt_rows' chunks
        for item in output.scheduled:
            start, num_new = item.start, item.num_new_tokens
            end = start + num_new
            blocks = item.block_ids
            if num_new == 1:  # decode: the common case, kept free of per-token generators
                known = item.request.all_token_ids
                if start < len(known):
                    input_ids.append(known[start])
                    if start < len(item.request.prompt_token_ids) - 1:  # a one-token prompt chunk
                        self._note_scoring(scoring, item, len(input_ids) - 1)
                else:
                    gather_to.append(len(input_ids))
                    gather_from.append(last_rows[item.request.request_id])
                    input_ids.append(0)
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                if start < len(item.request.prompt_token_ids) - 1:
                    self._note_scoring(scoring, item, len(input_ids))
                input_ids.extend(item.token_ids)
                span = range(start, end)
                positions.extend(span)
                slots.extend(blocks[p // bs] * bs + p % bs for p in span)
            block_rows.extend(blocks)
            block_rows.extend([0] * (max_blocks - len(blocks)))
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(end)
            if item.sample:
                logits_indices.append(query_start[-1] - 1)
                sample_ids.append(item.request.request_id)
        return HostStep(
            input_ids,
            positions,
            slots,
            logits_indices,
            query_start,
            seq_lens,
            block_rows,
            gather_to,
            gather_from,
            max_blocks=max_blocks,
            max_query_len=max(item.num_new_tokens for item in output.scheduled),
            sample_ids=sample_ids,
            prompt=prompt_rows(scoring) if scoring else None,
        )

    @staticmethod
    def _note_scoring(scoring: list, item: ScheduledRequest, row0: int) -> None:
        """Note a prompt chunk starting at input row `row0` if its request scores its prompt."""
        request = item.request
        if request.scores_prompt:
            scoring.append(
                (
                    request.request_id,
                    request.prompt_token_ids,
                    item.start,
                    item.num_new_tokens,
                    row0,
                    request.params.prompt_logprobs,
                )
            )

    def device_inputs(self, host: HostStep) -> StepInputs:
        seq_lens, query_start, max_blocks = host.seq_lens, host.query_start, host.max_blocks
        ids_d, pos_d, slots_d, logits_d, qsl_d, lens_d, tables_d, to_d, from_d = self._staging.to_device(
            [
                host.input_ids,
                host.positions,
                host.slots,
                host.logits_indices,
                query_start,
                seq_lens,
                host.block_rows,
                host.gather_to,
                host.gather_from,
            ]
        )
        tp = self.model.tp
        if host.gather_to:
            if tp is None or tp.rank == 0:  # only rank 0 samples: the others take its ids
                assert self._last_tokens is not None
                ids_d.index_copy_(0, to_d, self._last_tokens.index_select(0, from_d))
            if tp is not None:
                tp.broadcast(ids_d)
        metadata = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d.to(torch.int32),
            seq_lens=lens_d.to(torch.int32),
            block_tables=tables_d.to(torch.int32).view(len(seq_lens), max_blocks),
            max_query_len=host.max_query_len,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )
        return StepInputs(
            input_ids=ids_d,
            positions=pos_d,
            metadata=metadata,
            logits_indices=logits_d,
            sample_ids=host.sample_ids,
            prompt=host.prompt,
        )

    def _sampling_row(self, item: ScheduledRequest) -> SamplingRow:
        # Built for every sampled request every step: one dict lookup, positional fields.
        request = item.request
        generator = self._generators.get(request.request_id, _NO_GENERATOR_YET)
        if generator is _NO_GENERATOR_YET:
            generator = make_generator(request.params.seed, self.device)
            self._generators[request.request_id] = generator
        return SamplingRow(
            request.params,
            request.prompt_token_ids,
            request.output_token_ids,
            generator,
            request.eos_token_ids,
            # The tokens before the one this step samples that the host has not read yet (counted from
            # the step, not the request: a later step may be scheduled before this one samples).
            max(0, item.start + item.num_new_tokens - len(request.all_token_ids)),
            # A request that finished since the step was scheduled samples unconstrained: its token is
            # dropped, and its grammar allows nothing more.
            None if request.status.finished else request.matcher,
        )

    def _mask_staging(self, rows: int) -> torch.Tensor:
        """A [rows, words] int32 host buffer for the step's token masks: pinned on CUDA, two of them used in
        turn, since the copy of the step still in flight may not have left the other one yet."""
        assert self.grammars is not None
        self._mask_turn ^= 1
        buffer = self._masks[self._mask_turn]
        if buffer is None or buffer.shape[0] < rows:
            pinned = self.device.type == "cuda"
            words = self.grammars.mask_words()
            buffer = torch.empty((max(rows, 8), words), dtype=torch.int32, pin_memory=pinned)
            self._masks[self._mask_turn] = buffer
        return buffer[:rows]
