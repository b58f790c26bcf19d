"""Prompt logprobs (`SamplingParams.prompt_logprobs`): each prompt token's logprob given the tokens before it.

A step that computes prompt positions p..q-1 of a request that scores its prompt scores the prompt tokens
p+1..q (never past the prompt's last token, whose row samples the first output token instead): the hidden
state at position i gives the logits of token i+1. Rules, as for sampled tokens (kiln.engine.sampler): the
model's raw distribution (log_softmax of its logits, nothing applied), rank = 1 + the number of strictly
more likely tokens, top alternatives most likely first. The first prompt token is never scored (None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kiln.engine.host_transfer import to_host
from kiln.engine.outputs import Logprob, PromptLogprobs, TokenLogprobs
from kiln.engine.sampler import rank_tokens

# Logits of at most this many rows at once. A piece holds about three [rows, vocab] float32 tensors
# (logits, their log_softmax, the rank comparison): ~400 MB at 256 rows of a 128k vocabulary, within the
# slack the KV cache's sizing leaves (kiln.engine.memory_profile); a 32k-token prompt in one piece
# would need 48 GB.
ROWS_PER_PIECE = 256


@dataclass(slots=True)
class PromptRows:
    """What one step scores: hidden-state rows, the token each row's logits score, and per request the
    positions they are (request id, first scored position, count), in row order."""

    rows: list[int]
    targets: list[int]
    spans: list[tuple[str, int, int]]
    top: int  # alternatives per row: the most any of the step's requests asks for


@dataclass(slots=True)
class PromptScores:
    """A step's scored rows (device tensors, then their host copies): the target's logprob and rank, and
    the `top` most likely tokens with their logprobs (`top` may be 0)."""

    spans: list[tuple[str, int, int]]
    logprobs: torch.Tensor  # [R] float32
    ranks: torch.Tensor  # [R] int64
    top_logprobs: torch.Tensor  # [R, top] float32
    top_ids: torch.Tensor  # [R, top] int64

    def to_host(self) -> PromptScores:
        """Host copies, queued (non-blocking into pinned memory on CUDA)."""
        return PromptScores(
            self.spans,
            to_host(self.logprobs),
            to_host(self.ranks),
            to_host(self.top_logprobs),
            to_host(self.top_ids),
        )


def prompt_rows(scoring: Sequence[tuple[str, list[int], int, int, int, int]]) -> PromptRows | None:
    """The rows a step scores, from (request id, prompt ids, first position computed, tokens computed,
    first row in the step, alternatives asked) of each scoring request's chunk; None when none scores."""
    rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[str, int, int]] = []
    top = 0
    for request_id, prompt, start, num_new, row0, asked in scoring:
        stop = min(start + num_new, len(prompt) - 1)
        if stop <= start:
            continue
        rows.extend(range(row0, row0 + stop - start))
        targets.extend(prompt[start + 1 : stop + 1])
        spans.append((request_id, start + 1, stop - start))
        top = max(top, asked)
    return PromptRows(rows, targets, spans, top) if spans else None


def score(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    spans: list[tuple[str, int, int]],
    top: int,
) -> PromptScores:
    """Score `targets` from the logits of `hidden[rows]`, ROWS_PER_PIECE rows at a time. With tensor
    parallelism every rank runs this (compute_logits gathers across ranks), in the same pieces."""
    pieces = []
    for begin in range(0, rows.numel(), ROWS_PER_PIECE):
        piece = slice(begin, begin + ROWS_PER_PIECE)
        lp = torch.log_softmax(compute_logits(hidden[rows[piece]]).float(), dim=-1)
        pieces.append(rank_tokens(lp, targets[piece], top))
    return PromptScores(spans, *(torch.cat(parts) for parts in zip(*pieces, strict=True)))


class PromptLogprobsBuilder:
    """One request's prompt logprobs as its steps score them. A prompt computed again (preempted before
    its first output) scores the same positions again: the later scores replace the earlier ones."""

    def __init__(self, prompt_token_ids: list[int], top: int) -> None:
        self.prompt = prompt_token_ids
        self.top = top
        self.entries: PromptLogprobs = [None] * len(prompt_token_ids)

    def add(
        self, scores: PromptScores, row0: int, first: int, count: int, decode: Callable[[int], str]
    ) -> None:
        """Take rows row0..row0+count-1 of host `scores` as the entries of positions first..first+count-1."""
        logprobs = scores.logprobs[row0 : row0 + count].tolist()
        ranks = scores.ranks[row0 : row0 + count].tolist()
        top_ids = scores.top_ids[row0 : row0 + count, : self.top].tolist()
        top_lps = scores.top_logprobs[row0 : row0 + count, : self.top].tolist()
        for i in range(count):
            token = self.prompt[first + i]
            entry: TokenLogprobs = {
                tid: Logprob(logprob=lp, rank=rank, decoded=decode(tid))
                for rank, (tid, lp) in enumerate(zip(top_ids[i], top_lps[i], strict=True), start=1)
            }
            entry[token] = Logprob(logprob=logprobs[i], rank=ranks[i], decoded=decode(token))
            self.entries[first + i] = entry

    def result(self) -> PromptLogprobs:
        """The entries of every prompt position; raises RuntimeError if a position after the first was
        never scored (a step that should have scored it did not)."""
        missing = [p for p in range(1, len(self.prompt)) if self.entries[p] is None]
        if missing:
            raise RuntimeError(f"prompt logprobs missing for {len(missing)} positions, from {missing[0]}")
        return self.entries
