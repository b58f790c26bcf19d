"""Admission control: whether a new request may join the queue, and the server's lifecycle gates.

Rules:
- A request "waits" from admission until its first output arrives (or it ends). The server counts
  waiting requests and their prompt tokens itself, so a burst is limited exactly rather than by an
  engine snapshot that lags behind it.
- Over `max_waiting_requests` or `max_waiting_tokens` -> 429 with Retry-After.
- Before the engine is started, and once draining has begun, new work gets 503.
"""

from __future__ import annotations

from kiln.serve.errors import OverloadedError, UnavailableError


class Ticket:
    """One admitted request's place in the waiting count; `started()` and `release()` are idempotent."""

    __slots__ = ("_admission", "_tokens", "_waiting")

    def __init__(self, admission: Admission, tokens: int) -> None:
        self._admission = admission
        self._tokens = tokens
        self._waiting = True

    def started(self) -> None:
        """The request produced its first output: it no longer counts as waiting."""
        if self._waiting:
            self._waiting = False
            self._admission.waiting_requests -= 1
            self._admission.waiting_tokens -= self._tokens

    release = started  # ending (for any reason) also ends the wait


class Admission:
    def __init__(
        self, *, max_waiting_requests: int | None, max_waiting_tokens: int | None, retry_after_seconds: int
    ) -> None:
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.retry_after_seconds = retry_after_seconds
        self.waiting_requests = 0
        self.waiting_tokens = 0
        self.ready = False
        self.draining = False
        self.failed: str | None = None  # why the engine could not start

    def check_accepting(self) -> None:
        """Raise 503 unless the server takes new work."""
        if self.failed is not None:
            raise UnavailableError(f"the engine failed to start: {self.failed}", code="engine_failed")
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another replica", code="draining")
        if not self.ready:
            raise UnavailableError("the model is still loading; retry shortly", code="not_ready")

    def admit(self, prompt_tokens: int) -> Ticket:
        """Take a place in the queue for a request with `prompt_tokens` prompt tokens, or raise 429/503."""
        self.check_accepting()
        headers = {"Retry-After": str(self.retry_after_seconds)}
        if self.max_waiting_requests is not None and self.waiting_requests + 1 > self.max_waiting_requests:
            raise OverloadedError(
                f"too many requests waiting ({self.waiting_requests} of {self.max_waiting_requests}); "
                "retry later",
                headers=headers,
            )
        # A prompt larger than the whole token limit still runs when nothing else waits, else it never could.
        over_tokens = (
            self.max_waiting_tokens is not None
            and self.waiting_tokens > 0
            and self.waiting_tokens + prompt_tokens > self.max_waiting_tokens
        )
        if over_tokens:
            raise OverloadedError(
                f"too many prompt tokens waiting ({self.waiting_tokens} + {prompt_tokens} > "
                f"{self.max_waiting_tokens}); retry later",
                headers=headers,
            )
        self.waiting_requests += 1
        self.waiting_tokens += prompt_tokens
        return Ticket(self, prompt_tokens)
