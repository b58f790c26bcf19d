"""How a canary is judged against the stable version: live windows of finished requests, and the rule.

Rules (`judge`):
- Both versions' windows cover the same span: they are reset together when a canary step begins.
- Errors are judged as they come: once the canary has failed `MIN_ERRORS` requests or finished
  `min_requests`, an error rate above the stable version's by more than `max_error_rate` rolls it back.
  (A failed canary request is retried on the stable version before its first token, so users do not see
  it; it still counts against the canary.)
- Latency is judged when the step is over (its time passed and the canary finished `min_requests`): a
  p99 time to first token or inter-token latency above the stable version's times `max_latency_ratio`,
  plus `LATENCY_SLACK_SECONDS` (so microsecond noise on an idle server never decides), rolls it back.
  A metric the stable version has no samples of in the window is not compared.
- Otherwise the step passes once it is over, and the canary waits while it is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

MIN_ERRORS = 3
LATENCY_SLACK_SECONDS = 0.005
QUANTILE = 0.99


def quantile(samples: list[float], q: float) -> float | None:
    """The nearest-rank quantile (None without samples)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(slots=True)
class LiveWindow:
    """One version's requests since `reset()`: finished ones, failed ones, TTFT and per-token ITL samples."""

    requests: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.requests = self.errors = 0
        self.ttft.clear()
        self.itl.clear()

    def observe_output(self, ttft: float | None, gap: float | None, num_tokens: int) -> None:
        """An output arrived: `ttft` for the first one, else `gap` seconds after the previous one."""
        if ttft is not None:
            self.ttft.append(ttft)
        elif gap is not None and num_tokens > 0:
            self.itl.extend([gap / num_tokens] * num_tokens)

    def finish(self, ok: bool) -> None:
        self.requests += 1
        self.errors += not ok

    def summary(self) -> WindowSummary:
        return WindowSummary(
            requests=self.requests,
            errors=self.errors,
            ttft_p99=quantile(self.ttft, QUANTILE),
            itl_p99=quantile(self.itl, QUANTILE),
        )


@dataclass(frozen=True, slots=True)
class WindowSummary:
    requests: int
    errors: int
    ttft_p99: float | None
    itl_p99: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    min_requests: int
    max_error_rate: float
    max_latency_ratio: float


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Literal["wait", "pass", "rollback"]
    reason: str  # for a rollback: errors, ttft or itl; else a few words for the log
    detail: str = ""


def judge(canary: WindowSummary, stable: WindowSummary, policy: CanaryPolicy, time_is_up: bool) -> Verdict:
    """The canary's verdict for its current step (see the module rules)."""
    enough = canary.errors >= MIN_ERRORS or canary.requests >= policy.min_requests
    if enough and canary.error_rate > stable.error_rate + policy.max_error_rate:
        return Verdict(
            "rollback",
            "errors",
            f"{canary.errors} of {canary.requests} requests failed ({canary.error_rate:.1%}) against "
            f"{stable.error_rate:.1%} on the stable version (allowed: +{policy.max_error_rate:.1%})",
        )
    if not time_is_up or canary.requests < policy.min_requests:
        return Verdict("wait", "step running", f"{canary.requests} of {policy.min_requests} requests")
    for name, mine, theirs in (
        ("ttft", canary.ttft_p99, stable.ttft_p99),
        ("itl", canary.itl_p99, stable.itl_p99),
    ):
        if mine is None or theirs is None:
            continue
        allowed = theirs * policy.max_latency_ratio + LATENCY_SLACK_SECONDS
        if mine > allowed:
            label = "time to first token" if name == "ttft" else "inter-token latency"
            return Verdict(
                "rollback",
                name,
                f"p99 {label} {mine * 1e3:.1f} ms against {theirs * 1e3:.1f} ms on the stable version "
                f"(allowed: {allowed * 1e3:.1f} ms)",
            )
    return Verdict("pass", "step passed", f"{canary.requests} requests, {canary.errors} failed")
