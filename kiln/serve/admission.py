"""Admission control: whether a new request may join the queue, and the server's lifecycle gates.

Rules:
- A request "waits" from admission until its first output arrives (or it ends). The server counts
  waiting requests, their sequences (prompts x n: what the engine schedules) and their tokens (prompt
  plus output budget, per sequence) itself, so a burst is limited exactly rather than by an engine
  snapshot that lags behind it, and a request is weighed by what it costs, not counted as one.
- Over `max_waiting_sequences` or `max_waiting_tokens` -> 429 with Retry-After. A request holding more
  sequences than `max_waiting_sequences` could never be admitted: 400. One over the token limit still
  runs when nothing else waits (a long prompt is legitimate), else it never could.
- With a `forecaster` (SLO-driven batching, kiln.serve.slo), a request with a deadline whose predicted
  time to first token (the prompt tokens of the requests waiting ahead of it and its own, at the
  measured drain rate) exceeds the time it has left -> 429 `deadline_unmeetable` at once, Retry-After
  the seconds until the queue ahead drains. Without a measured rate (cold start) it is never refused.
- Before the engine is started, while it is down (being restarted), and once draining has begun, new
  work gets 503.
"""

from __future__ import annotations

from kiln.serve.errors import InvalidRequestError, OverloadedError, UnavailableError
from kiln.serve.slo_predict import TtftForecaster


class Ticket:
    """One admitted request's place in the waiting counts; `started()` and `release()` are idempotent."""

    __slots__ = ("_admission", "_prompt_tokens", "_sequences", "_tokens", "_waiting")

    def __init__(self, admission: Admission, sequences: int, tokens: int, prompt_tokens: int = 0) -> None:
        self._admission = admission
        self._sequences = sequences
        self._tokens = tokens
        self._prompt_tokens = prompt_tokens
        self._waiting = True

    def started(self) -> None:
        """The request produced its first output: it no longer counts as waiting."""
        if self._waiting:
            self._waiting = False
            self._admission.waiting_requests -= 1
            self._admission.waiting_sequences -= self._sequences
            self._admission.waiting_tokens -= self._tokens
            self._admission.waiting_prompt_tokens -= self._prompt_tokens

    release = started  # ending (for any reason) also ends the wait


class Admission:
    def __init__(
        self, *, max_waiting_sequences: int | None, max_waiting_tokens: int | None, retry_after_seconds: int
    ) -> None:
        self.max_waiting_sequences = max_waiting_sequences
        self.max_waiting_tokens = max_waiting_tokens
        self.retry_after_seconds = retry_after_seconds
        self.waiting_requests = 0
        self.waiting_sequences = 0
        self.waiting_tokens = 0
        self.waiting_prompt_tokens = 0  # the prompts alone, once per prompt (n samples share one)
        self.forecaster: TtftForecaster | None = None  # set by SLO-driven batching
        self.ready = False
        self.draining = False
        self.failed: str | None = None  # why the engine could not start, or is down for good
        self.down: str | None = None  # why the engine is down while it is being restarted

    def check_accepting(self) -> None:
        """Raise 503 unless the server takes new work."""
        if self.failed is not None:
            raise UnavailableError(f"the engine is not running: {self.failed}", code="engine_failed")
        if self.down is not None:
            raise UnavailableError(
                f"the engine is restarting ({self.down}); retry shortly", code="engine_down"
            )
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another replica", code="draining")
        if not self.ready:
            raise UnavailableError("the model is still loading; retry shortly", code="not_ready")

    def admit(
        self, sequences: int, tokens: int, *, prompt_tokens: int = 0, time_left: float | None = None
    ) -> Ticket:
        """Take a place in the queue for a request of `sequences` sequences (prompts x n) and `tokens`
        tokens (prompt plus output budget, summed over its sequences), `prompt_tokens` of prompt (once
        per prompt) and `time_left` seconds until its deadline (None: none), or raise 400/429/503."""
        self.check_accepting()
        limit = self.max_waiting_sequences
        if limit is not None and sequences > limit:
            raise InvalidRequestError(
                f"the request holds {sequences} sequences (prompts x n); this server takes at most {limit}",
                param="n",
            )
        headers = {"Retry-After": str(self.retry_after_seconds)}
        if limit is not None and self.waiting_sequences + sequences > limit:
            raise OverloadedError(
                f"too many sequences waiting ({self.waiting_sequences} + {sequences} > {limit}); retry later",
                headers=headers,
            )
        over_tokens = (
            self.max_waiting_tokens is not None
            and self.waiting_tokens > 0
            and self.waiting_tokens + tokens > self.max_waiting_tokens
        )
        if over_tokens:
            raise OverloadedError(
                f"too many tokens waiting ({self.waiting_tokens} + {tokens} > {self.max_waiting_tokens}); "
                "retry later",
                headers=headers,
            )
        if time_left is not None:
            self._check_deadline(prompt_tokens, time_left)
        self.waiting_requests += 1
        self.waiting_sequences += sequences
        self.waiting_tokens += tokens
        self.waiting_prompt_tokens += prompt_tokens
        return Ticket(self, sequences, tokens, prompt_tokens)

    def _check_deadline(self, prompt_tokens: int, time_left: float) -> None:
        """429 when the request's predicted time to first token exceeds the `time_left` it has."""
        ahead = self.waiting_prompt_tokens
        forecast = None if self.forecaster is None else self.forecaster.forecast(ahead, prompt_tokens)
        if forecast is None or forecast.ttft_seconds <= time_left:
            return
        raise OverloadedError(
            f"this request would wait about {forecast.ttft_seconds:.1f} s for its first token "
            f"({ahead} prompt tokens queued ahead of its {prompt_tokens}, computed at "
            f"{forecast.rate.prefill_tokens_per_second:.0f} tokens/s), past its deadline "
            f"({max(time_left, 0.0):.1f} s left); retry later",
            code="deadline_unmeetable",
            headers={"Retry-After": str(forecast.retry_after_seconds)},
        )
