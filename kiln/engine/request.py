"""`Request`: one sequence's scheduling state. Pure bookkeeping (no torch), owned by the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kiln.engine.outputs import FinishReason, RequestMetrics
from kiln.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context limit
    FINISHED_ABORTED = "abort"  # client gone or engine shutting down

    @property
    def finished(self) -> bool:
        # Read for every request several times a step: a module tuple, not the class's members each call.
        return self in _FINISHED

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.value if self in _FINISHED else None  # type: ignore[return-value]


_FINISHED = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. For `n > 1` the engine makes n Requests that share a `group_id`.

    Invariant: `all_token_ids == prompt_token_ids + output_token_ids`, followed by
    `num_pending_tokens` tokens sampled on the device whose ids the host has not read yet (with
    overlapped steps, the next step is scheduled before the current one's tokens arrive). The first
    `num_computed_tokens` of them have their K/V in the request's KV blocks, or will once the steps
    already launched have run.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    max_output_tokens: int  # params.max_tokens, capped so prompt + output fits the context
    arrival_time: float
    priority: int = 0  # lower runs first (as vLLM); FCFS within a priority
    group_id: str | None = None  # the caller's request id when this is one of n samples
    # Requests with one owner share one fair share of the engine (see kiln.engine.scheduler); None: the
    # caller's request alone (its group).
    owner: str | None = None
    # The structured output's llguidance matcher (kiln.engine.structured), advanced with each output token.
    matcher: Any = None
    index: int = 0  # which of the n samples
    # A sibling in an n > 1 group waits until this request has computed the shared prompt, so it finds
    # the prompt's blocks in the prefix cache instead of computing them again.
    wait_for: Request | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first schedule
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def scores_prompt(self) -> bool:
        """Its prompt is still to be scored (`SamplingParams.prompt_logprobs`): every prompt token needs
        logits, so the prompt is computed whole. Done once the request has an output token."""
        return self.params.prompt_logprobs is not None and not self.output_token_ids

    @property
    def owner_key(self) -> str:
        return self.owner or self.group_id or self.request_id

    def sort_key(self) -> tuple[int, float, str]:
        return (self.priority, self.arrival_time, self.request_id)
