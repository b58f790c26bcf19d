"""What the engine hands back: per-step deltas of each request's completions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token, with its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int
    decoded: str | None = None


# One entry per generated token: token id -> Logprob, holding the sampled token and the top-k alternatives.
TokenLogprobs = dict[int, Logprob]

# One entry per prompt token, the same shape with the prompt's own token in place of the sampled one; the
# first prompt token has no context to score it, so its entry is None.
PromptLogprobs = list[TokenLogprobs | None]


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's `n` completions.

    From `AsyncEngine.generate` and `LLMEngine.step` it is a *delta*: `text`, `token_ids` and
    `logprobs` hold only what is new since the previous output of this completion. `LLM.generate`
    returns the accumulated whole.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended it (None for EOS or length).
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (time.monotonic) of one request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0


@dataclass(slots=True)
class RequestOutput:
    """Output of one request (all its `n` completions) at one step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: in the request's first output only (deltas carry them once).
    prompt_logprobs: PromptLogprobs | None = None


def accumulate(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a step's delta into the running whole of a request's output (`LLM.generate`); folding
    consecutive deltas gives one delta that stands for all of them (a stream catching up)."""
    if total is None:
        total = dataclasses.replace(delta, outputs=[])
    by_index = {c.index: c for c in total.outputs}
    for piece in delta.outputs:
        whole = by_index.get(piece.index)
        if whole is None:
            whole = CompletionOutput(index=piece.index, logprobs=[] if piece.logprobs is not None else None)
            by_index[piece.index] = whole
        whole.text += piece.text
        whole.token_ids.extend(piece.token_ids)
        if piece.logprobs is not None and whole.logprobs is not None:
            whole.logprobs.extend(piece.logprobs)
        whole.cumulative_logprob = piece.cumulative_logprob
        whole.finish_reason = piece.finish_reason
        whole.stop_reason = piece.stop_reason
    total.outputs = [by_index[i] for i in sorted(by_index)]
    total.finished = delta.finished
    total.metrics = delta.metrics
    total.num_cached_tokens = delta.num_cached_tokens
    if delta.prompt_logprobs is not None:
        total.prompt_logprobs = delta.prompt_logprobs
    return total


def coalesce(deltas: list[RequestOutput]) -> RequestOutput:
    """One delta standing for consecutive deltas of one request, as folding them with `accumulate`
    would give, in one pass: a stream that fell behind sends its backlog as one chunk."""
    if len(deltas) == 1:
        return deltas[0]
    pieces: dict[int, list[CompletionOutput]] = {}
    for delta in deltas:
        for piece in delta.outputs:
            pieces.setdefault(piece.index, []).append(piece)
    outputs = []
    for index in sorted(pieces):
        run, last = pieces[index], pieces[index][-1]
        logprobs = None
        if run[0].logprobs is not None:
            logprobs = [entry for piece in run if piece.logprobs is not None for entry in piece.logprobs]
        outputs.append(
            CompletionOutput(
                index=index,
                text="".join(piece.text for piece in run),
                token_ids=[token for piece in run for token in piece.token_ids],
                logprobs=logprobs,
                cumulative_logprob=last.cumulative_logprob,
                finish_reason=last.finish_reason,
                stop_reason=last.stop_reason,
            )
        )
    first, last = deltas[0], deltas[-1]
    return RequestOutput(
        request_id=first.request_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=outputs,
        finished=last.finished,
        metrics=last.metrics,
        num_cached_tokens=last.num_cached_tokens,
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
    )
