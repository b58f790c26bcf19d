"""`ModelRunner`: the one place a `SchedulerOutput` becomes tensors, a forward pass and sampled tokens."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kiln.engine.attention_metadata import AttentionMetadata
from kiln.engine.cuda_graphs import DecodeGraphs
from kiln.engine.request import Request
from kiln.engine.sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRow, make_generator
from kiln.engine.scheduler import SchedulerOutput
from kiln.models.llama import LlamaForCausalLM


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from (last token of sampling requests)
    sample_ids: list[str]  # request ids, one per logits row


@dataclass(slots=True)
class SampledTokens:
    """Host-side result of one step: the sampled token and its logprobs per request id."""

    token_ids: dict[str, int]
    output: SamplerOutput | None
    row_of: dict[str, int]  # request id -> row in `output`


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
        self.graphs: DecodeGraphs | None = None  # set by capture_decode_graphs on CUDA
        self._staging = HostStaging(device)
        # Seeded requests keep their own RNG across steps (and across preemption), so their samples do not
        # depend on what else is in the batch.
        self._generators: dict[str, torch.Generator | None] = {}

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> SampledTokens:
        for request_id in output.finished_ids:
            self._generators.pop(request_id, None)
        if output.is_empty:
            return SampledTokens(token_ids={}, output=None, row_of={})
        inputs = self.prepare_inputs(output)
        hidden = self._forward(inputs)
        if not inputs.sample_ids:
            return SampledTokens(token_ids={}, output=None, row_of={})
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        rows = [self._sampling_row(item.request) for item in output.scheduled if item.sample]
        batch = SamplingBatch.build(rows, self.vocab_size, self.device)
        sampled = self.sampler(logits, batch)
        token_ids = sampled.token_ids.tolist()  # the step's one device -> host transfer of tokens
        if sampled.logprobs is not None:  # (on CPU, .cpu() returns the tensors as they are)
            # Logprobs cross once per step here, not once per request in the output processor.
            sampled = SamplerOutput(
                token_ids=sampled.token_ids,
                **{
                    name: None if tensor is None else tensor.cpu()
                    for name, tensor in (
                        ("logprobs", sampled.logprobs),
                        ("topk_token_ids", sampled.topk_token_ids),
                        ("topk_logprobs", sampled.topk_logprobs),
                        ("ranks", sampled.ranks),
                    )
                },
            )
        return SampledTokens(
            token_ids=dict(zip(inputs.sample_ids, token_ids, strict=True)),
            output=sampled,
            row_of={rid: i for i, rid in enumerate(inputs.sample_ids)},
        )

    def capture_decode_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            block_size=self.block_size,
            device=self.device,
        )
        self.graphs.capture()

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.metadata
        if self.graphs is not None and meta.is_pure_decode and self.graphs.bucket_for(meta.num_seqs):
            return self.graphs.run(inputs.input_ids, inputs.positions, meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)

    def prepare_inputs(self, output: SchedulerOutput) -> StepInputs:
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
        for item in output.scheduled:
            start, num_new = item.start, item.num_new_tokens
            end = start + num_new
            blocks = item.block_ids
            if num_new == 1:  # decode: the common case, kept free of per-token generators
                input_ids.append(item.request.all_token_ids[start])
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
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
        ids_d, pos_d, slots_d, logits_d, qsl_d, lens_d, tables_d = self._staging.to_device(
            [input_ids, positions, slots, logits_indices, query_start, seq_lens, block_rows]
        )
        metadata = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d.to(torch.int32),
            seq_lens=lens_d.to(torch.int32),
            block_tables=tables_d.to(torch.int32).view(len(seq_lens), max_blocks),
            max_query_len=max(item.num_new_tokens for item in output.scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        return StepInputs(
            input_ids=ids_d,
            positions=pos_d,
            metadata=metadata,
            logits_indices=logits_d,
            sample_ids=sample_ids,
        )

    def _sampling_row(self, request: Request) -> SamplingRow:
        request_id = request.request_id
        if request_id not in self._generators:
            self._generators[request_id] = make_generator(request.params.seed, self.device)
        return SamplingRow(
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator=self._generators[request_id],
            eos_token_ids=request.eos_token_ids,
        )


class HostStaging:
    """Moves a step's integer inputs to the device in ONE copy.

    On CUDA the lists are written into a persistent pinned buffer and copied with non_blocking=True, so
    the host does not wait for the GPU to drain (a copy from pageable memory would). Safe to reuse the
    buffer every step because each step ends by reading its sampled tokens, which waits for the copy.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = torch.empty(0, dtype=torch.int64)

    def to_device(self, parts: list[list[int]]) -> list[torch.Tensor]:
        sizes = [len(part) for part in parts]
        flat = torch.tensor(list(itertools.chain.from_iterable(parts)), dtype=torch.int64)
        if self.device.type != "cuda":
            return list(flat.to(self.device).split(sizes))
        if self._pinned.numel() < flat.numel():
            self._pinned = torch.empty(
                max(flat.numel(), 2 * self._pinned.numel()), dtype=torch.int64
            ).pin_memory()
        staged = self._pinned[: flat.numel()]
        staged.copy_(flat)
        return list(staged.to(self.device, non_blocking=True).split(sizes))


@torch.inference_mode()
def profile_activation_bytes(
    model: LlamaForCausalLM, num_tokens: int, num_logits: int, block_size: int
) -> int:
    """Peak CUDA memory a step of `num_tokens` prefill tokens needs beyond the weights (one sequence,
    a throwaway KV cache just large enough), so the real KV cache can take the rest."""
    from kiln.kvcache.tensors import allocate_kv_cache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_tokens = min(num_tokens, model.max_positions)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    num_blocks = -(-num_tokens // block_size)
    kv = allocate_kv_cache(model.config, num_blocks, block_size, dtype, device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        query_start_loc_cpu=[0, num_tokens],
        seq_lens_cpu=[num_tokens],
        block_size=block_size,
    )
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(ids, torch.arange(num_tokens, device=device), kv, meta)
    model.compute_logits(hidden[: min(num_logits, num_tokens)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del kv, hidden
    torch.cuda.empty_cache()
    return peak
