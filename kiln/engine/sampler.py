"""The sampler: one batched pass from a step's logits to its sampled tokens (and their logprobs).

Rules of the interface:
- `SamplingBatch.build` runs on the host once per step and decides which stages are needed (host bools),
  so `Sampler.__call__` never asks the device a question: no `.item()`, no `.any()`; the only sync is the
  caller reading `SamplerOutput.token_ids`. Its tensors reach the device by non-blocking copies from
  pinned memory (the per-row parameters in one copy, none at all for a batch of plain greedy rows), so
  building the batch never waits for the GPU to finish the forward pass it follows.
- Stage order, per row: allowed_token_ids (every other token -inf) -> a structured output's token mask
  (disallowed tokens -inf) -> logit_bias -> min_tokens suppression of stop/EOS ids -> penalties (repetition,
  CTRL/HF style over prompt + output tokens; presence/frequency, OpenAI style over output tokens) ->
  logprobs -> greedy rows take the argmax -> temperature -> top-k -> top-p -> min-p -> sample.
- A batch of plain greedy rows (`SamplingBatch.plain_greedy`: nothing edits a logit, no logprobs) takes the
  argmax of the logits in their own dtype. Widening 16-bit floats to float32 is exact and keeps their order,
  and argmax breaks ties at the first index either way, so the tokens are the same, without writing a
  float32 copy of every logit (twice their bytes) and reading it back.
- Logprobs are log_softmax of the *penalized* logits before temperature and truncation: they describe the
  model as steered by the request's biases and penalties, not an artefact of the sampling knobs (a
  temperature-0 request still gets meaningful logprobs, and top-k never makes a token's logprob -inf).
- Sampling is an exponential race: argmax(p / E) with E ~ Exponential(1) i.i.d. draws exactly from p.
  A row with its own generator draws its noise from it alone, V numbers per step, so a seeded request's
  samples do not depend on its neighbours in the batch; the other rows share one draw from the global RNG.
- Generators must live on the logits' device (see `make_generator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kiln.engine.sampling_params import SamplingParams
from kiln.kernels import apply_token_bitmask

# Smallest noise value: an Exponential(1) draw of exactly 0 would make p / E a 0 / 0 = NaN for a masked token,
# and argmax picks NaN.
_MIN_NOISE = 1e-10


@dataclass(slots=True)
class SamplingRow:
    """What the model runner knows about one request it samples this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None  # the request's own RNG (seeded requests); None: the global RNG
    eos_token_ids: Sequence[int]
    # Tokens this row already sampled whose ids are not on the host yet (overlapped steps): they count
    # towards min_tokens. A row with a penalty must have none, as penalties need every output id.
    num_pending_tokens: int = 0
    matcher: Any = None  # a structured output's matcher (kiln.engine.structured): what it allows is sampled


@dataclass(slots=True)
class SamplingBatch:
    """The per-row sampling parameters of one step as device tensors, plus host flags that skip stages.

    Token-id matrices are right-padded with `vocab_size`, an id one past the vocabulary, so they can be
    scattered into a [B, V + 1] table whose last column is dropped.
    """

    # [7, B] float32, one row per knob (see the properties below); None when every row is greedy
    # without penalties, as then no stage reads them.
    params: Tensor | None
    generators: list[torch.Generator | None]
    max_num_logprobs: int | None  # max over rows of params.logprobs; None: no row asked
    vocab_size: int
    # [B, Lo] int64 generated tokens; None when no row has a penalty.
    output_token_ids: Tensor | None = None
    # [B, Lp] int64 prompt tokens; None when no row has a repetition penalty.
    prompt_token_ids: Tensor | None = None
    # Sparse logit bias: [2, N] (row, token) index and [N] float32 values; None when no row has one.
    logit_bias_index: Tensor | None = None
    logit_bias_values: Tensor | None = None
    # [2, M] (row, token) pairs set to -inf: stop/EOS ids of rows that have not reached min_tokens.
    suppress_index: Tensor | None = None
    # allowed_token_ids: [2, K] (row, token) pairs a row may sample and [B] bool rows free of any such
    # list; None when no row has one.
    allowed_index: Tensor | None = None
    unrestricted: Tensor | None = None
    # [B, W] int32 bitmask of the tokens each row may sample (structured outputs); None: no row is held.
    token_mask: Tensor | None = None
    all_greedy: bool = False
    any_greedy: bool = False
    do_penalties: bool = False
    do_repetition_penalty: bool = False
    do_top_k: bool = False
    do_top_p: bool = False
    do_min_p: bool = False

    @property
    def plain_greedy(self) -> bool:
        """Every row greedy, no logprobs, and no stage that changes a logit before the argmax."""
        return (
            self.all_greedy
            and self.max_num_logprobs is None
            and self.token_mask is None
            and self.logit_bias_index is None
            and self.suppress_index is None
            and self.allowed_index is None
            and not self.do_penalties
        )

    temperature = property(lambda self: self.params[0])  # [B], 0 = greedy
    top_k = property(lambda self: self.params[1].to(torch.int64))  # [B], 0 = off
    top_p = property(lambda self: self.params[2])  # [B], 1 = off
    min_p = property(lambda self: self.params[3])  # [B], 0 = off
    presence_penalty = property(lambda self: self.params[4])
    frequency_penalty = property(lambda self: self.params[5])
    repetition_penalty = property(lambda self: self.params[6])  # 1 = off

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> SamplingBatch:
        """Raises ValueError for a logit_bias token id outside [0, vocab_size)."""
        params = [row.params for row in rows]
        greedy = [p.temperature == 0.0 for p in params]
        random_rows = [p for p in params if p.temperature != 0.0]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        do_rep = any(p.repetition_penalty != 1.0 for p in params)
        do_pen = do_rep or any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        if any(row.num_pending_tokens and row.params.needs_output_ids for row in rows):
            raise RuntimeError("penalties need every output token id on the host (no pending tokens)")
        knobs = None
        if random_rows or do_pen:  # top_k < 2**24, so float32 holds it exactly
            knobs = [
                [
                    p.temperature,
                    p.top_k or 0,
                    p.top_p,
                    p.min_p,
                    p.presence_penalty,
                    p.frequency_penalty,
                    p.repetition_penalty,
                ]
                for p in params
            ]
        batch = cls(
            params=None if knobs is None else to_device(knobs, torch.float32, device).T,
            generators=[row.generator for row in rows],
            max_num_logprobs=max(asked) if asked else None,
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            do_penalties=do_pen,
            do_repetition_penalty=do_rep,
            # The filters only matter for rows that sample; a greedy row's settings are ignored.
            do_top_k=any(p.top_k for p in random_rows),
            do_top_p=any(p.top_p < 1.0 for p in random_rows),
            do_min_p=any(p.min_p > 0.0 for p in random_rows),
        )
        if do_pen:
            batch.output_token_ids = _pad([row.output_token_ids for row in rows], vocab_size, device)
        if do_rep:
            batch.prompt_token_ids = _pad([row.prompt_token_ids for row in rows], vocab_size, device)

        bias_rows, bias_tokens, bias_values = [], [], []
        for i, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                token = int(token)
                if not 0 <= token < vocab_size:
                    raise ValueError(
                        f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})"
                    )
                bias_rows.append(i)
                bias_tokens.append(token)
                bias_values.append(float(bias))
        if bias_rows:
            batch.logit_bias_index = to_device([bias_rows, bias_tokens], torch.int64, device)
            batch.logit_bias_values = to_device(bias_values, torch.float32, device)

        pairs = [
            (i, token)
            for i, row in enumerate(rows)
            if len(row.output_token_ids) + row.num_pending_tokens < row.params.min_tokens
            for token in _stop_ids(row)
            if 0 <= token < vocab_size
        ]
        if pairs:
            batch.suppress_index = to_device(pairs, torch.int64, device).T.contiguous()
        allowed = [(i, t) for i, p in enumerate(params) if p.allowed_token_ids for t in p.allowed_token_ids]
        if allowed:
            batch.allowed_index = to_device(allowed, torch.int64, device).T.contiguous()
            free = [not p.allowed_token_ids for p in params]
            batch.unrestricted = to_device(free, torch.bool, device)
        return batch


@dataclass(slots=True)
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None = None  # [B] float32, of the sampled tokens (when any row asked)
    topk_token_ids: Tensor | None = None  # [B, K] int64, K = max_num_logprobs, most likely first
    topk_logprobs: Tensor | None = None  # [B, K] float32
    ranks: Tensor | None = None  # [B] int64, rank of the sampled token (1 = most likely)


class Sampler:
    """Stateless; see the module docstring for the order of stages and the logprob rule."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V], float32 or 16-bit (modified in place when float32)."""
        if batch.plain_greedy:
            return SamplerOutput(token_ids=logits.argmax(dim=-1))
        logits = logits.float()
        if batch.allowed_index is not None and batch.unrestricted is not None:
            keep = batch.unrestricted.unsqueeze(1).repeat(1, logits.shape[1])
            keep[tuple(batch.allowed_index)] = True
            logits.masked_fill_(~keep, float("-inf"))
        if batch.token_mask is not None:
            apply_token_bitmask(logits, batch.token_mask)
        if batch.logit_bias_index is not None:
            logits.index_put_(tuple(batch.logit_bias_index), batch.logit_bias_values, accumulate=True)
        if batch.suppress_index is not None:
            logits.index_put_(tuple(batch.suppress_index), torch.tensor(float("-inf"), device=logits.device))
        if batch.do_penalties:
            logits = apply_penalties(logits, batch)

        out = SamplerOutput(token_ids=torch.empty(0, dtype=torch.int64))
        logprobs = torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None

        greedy_ids = logits.argmax(dim=-1) if batch.any_greedy else None
        if batch.all_greedy:
            out.token_ids = greedy_ids
        else:
            temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
            scaled = logits / temperature.unsqueeze(1)
            if batch.do_top_k or batch.do_top_p:
                scaled = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
            if batch.do_min_p:
                scaled = apply_min_p(scaled, batch.min_p)
            sampled = exponential_race(torch.softmax(scaled, dim=-1), batch.generators)
            out.token_ids = (
                sampled if greedy_ids is None else torch.where(batch.temperature > 0, sampled, greedy_ids)
            )

        if logprobs is not None:
            out.logprobs, out.ranks, out.topk_logprobs, out.topk_token_ids = rank_tokens(
                logprobs, out.token_ids, batch.max_num_logprobs
            )
        return out


def rank_tokens(logprobs: Tensor, token_ids: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of `logprobs` [B, V]: the logprob of `token_ids` [B] and its rank, and the `top` most
    likely tokens' logprobs and ids ([B, top], most likely first). Ties count in the token's favour:
    rank = 1 + the number of strictly more likely tokens."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    values, ids = torch.topk(logprobs, top, dim=-1)
    return chosen.squeeze(1), (logprobs > chosen).sum(dim=-1) + 1, values, ids


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`; None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (CTRL / transformers' RepetitionPenaltyLogitsProcessor): a logit of a token seen in the
    prompt or output is divided by the penalty when positive, multiplied when negative. Presence and
    frequency (OpenAI): logit -= presence * [count > 0] + frequency * count, counts over output tokens."""
    num_rows, vocab = logits.shape
    output_ids = batch.output_token_ids
    assert output_ids is not None, "build() sets output_token_ids whenever a penalty is on"
    counts = torch.zeros((num_rows, vocab + 1), dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    if batch.do_repetition_penalty:
        assert batch.prompt_token_ids is not None
        seen = torch.zeros((num_rows, vocab + 1), dtype=torch.bool, device=logits.device)
        seen.scatter_(1, batch.prompt_token_ids, True)
        seen = seen[:, :vocab] | (counts > 0)
        penalty = batch.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
    return logits - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask (-inf) what top-k and then top-p exclude, per row. top_k 0 keeps all; a row keeps every token
    tied with its k-th. Top-p keeps the smallest most-likely set whose probability (after top-k) reaches
    top_p: a token stays while the mass strictly before it is < top_p, so the most likely always stays."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    # Rows with top_p == 1 are left alone: float round-off could push mass_before to 1 before the tail.
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability (min_p 0 keeps all).
    Done on logits: p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)."""
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def exponential_race(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Sample one token per row from probs [B, V]: argmax(probs / E), E ~ Exponential(1) i.i.d."""
    noise = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    # One loop iteration per seeded row is unavoidable: each row's noise must come from its own stream.
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    return (probs / noise.clamp_min_(_MIN_NOISE)).argmax(dim=-1)


def _stop_ids(row: SamplingRow) -> list[int]:
    """The token ids that would end this row: its stop_token_ids, and EOS unless ignore_eos."""
    ids = list(row.params.stop_token_ids)
    if not row.params.ignore_eos:
        ids.extend(row.eos_token_ids)
    return ids


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> Tensor:
    width = max((len(s) for s in seqs), default=0)
    padded = [list(s) + [pad_id] * (width - len(s)) for s in seqs]
    return to_device(padded, torch.int64, device).reshape(len(seqs), width)


def to_device(data: list, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A host list as a tensor on `device`. To a GPU it goes through pinned memory with a non-blocking
    copy: from pageable memory the copy would first wait for everything queued on the stream."""
    tensor = torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
