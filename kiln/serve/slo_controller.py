"""`SloController`: the decision rule of SLO-driven batching, with no engine, server or clock in it.

The rule, once per period (`tick`), from the windowed quantiles (at the target quantile) of the time to
first token and of the inter-token latency observed since the controller's last change (at most its
window; a quantile needs `MIN_SAMPLES` observations, else it is unknown):

- ITL over its target: tighten, one lever per period, the first not yet at its bound:
  1. halve the token budget (prefill chunks then stretch a step, and so every running stream's next
     token, by less: the longest step is what the ITL quantile sees), down to its floor;
  2. raise the admission interval by 1 (fewer steps carry new prompts), up to its most;
  3. cut the running-sequence cap by a quarter (the last resort: it turns work away), down to its floor.
- ITL with headroom (below `HEADROOM` of its target, or no ITL target) and either the TTFT quantile over
  its target or the queue growing (more prompt tokens waiting than at the last period, and more than one
  step's budget): relax, one lever per period, in the reverse order, each back toward the engine's
  configured value: the sequence cap up by a quarter, the admission interval down by 1, the budget up
  by a quarter.
- Otherwise (ITL between `HEADROOM` and its target, ITL unknown, or no pressure): hold.

Against oscillation: decreases are multiplicative and fast, increases slower; nothing moves in the dead
band between `HEADROOM` and the ITL target, and HEADROOM x RELAX = 1, so one relax step taken below the
band cannot carry the ITL past the target while the ITL grows at most in proportion to the budget; and
after each change the quantiles start over from observations made under the new limits, so a change is
never judged by latencies from before it. The token budget never goes below the sequence cap, so every
running sequence can decode in every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kiln.engine.info import BatchingLimits
from kiln.serve.slo_window import LatencyWindow

HEADROOM = 0.8  # relax only while the ITL quantile is below this fraction of its target
MIN_SAMPLES = 20  # observations a quantile needs since the last change (weighted: tokens for ITL)
TIGHTEN_BUDGET = 0.5
TIGHTEN_SEQS = 0.75
RELAX = 1.25


@dataclass(frozen=True, slots=True)
class SloTargets:
    ttft_seconds: float | None  # None: no target
    itl_seconds: float | None
    quantile: float = 0.99


@dataclass(frozen=True, slots=True)
class BatchingBounds:
    """Where the controller may move each limit; the maxima of the budget and the sequence cap are what
    the engine was configured with."""

    min_admission_interval: int
    max_admission_interval: int
    min_token_budget: int
    max_token_budget: int
    min_num_seqs: int
    max_num_seqs: int


@dataclass(frozen=True, slots=True)
class Decision:
    limits: BatchingLimits  # every limit set: what the engine is to run with now
    direction: str  # "tighten" | "relax"
    lever: str  # "token_budget" | "admission_interval" | "num_seqs"
    reason: str  # one line for the log


class SloController:
    """Feed it observations (`observe_ttft`, `observe_itl`); each `tick` closes a period and returns a
    `Decision`, or None to hold. `limits` are the limits in force (every one set)."""

    def __init__(
        self, targets: SloTargets, bounds: BatchingBounds, limits: BatchingLimits, *, window_periods: int
    ) -> None:
        self.targets = targets
        self.bounds = bounds
        self.limits = limits
        self.ttft = LatencyWindow(window_periods)
        self.itl = LatencyWindow(window_periods)
        self.ttft_quantile: float | None = None  # as seen by the last tick
        self.itl_quantile: float | None = None
        self._fresh = 0  # periods closed since the last change
        self._queued: int | None = None  # the queue at the last tick

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float, num_tokens: int = 1) -> None:
        """A delta of `num_tokens` tokens `seconds` after the request's previous one."""
        if num_tokens > 0:
            self.itl.observe(seconds / num_tokens, num_tokens)

    def tick(self, queued_tokens: int) -> Decision | None:
        """Close the period; `queued_tokens`: prompt tokens waiting for their first token now."""
        span = min(self._fresh + 1, self.ttft.num_slots)
        self.ttft_quantile = self._quantile(self.ttft, span)
        self.itl_quantile = self._quantile(self.itl, span)
        grew = self._queued is not None and queued_tokens > max(
            self._queued, self.limits.max_num_batched_tokens or 0
        )
        self._queued = queued_tokens
        decision = self._decide(grew)
        self.ttft.roll()
        self.itl.roll()
        if decision is None:
            self._fresh += 1
        else:
            self._fresh = 0
            self.limits = decision.limits
        return decision

    def _quantile(self, window: LatencyWindow, span: int) -> float | None:
        if window.count(span) < MIN_SAMPLES:
            return None
        return window.quantile(self.targets.quantile, span)

    def _decide(self, queue_grew: bool) -> Decision | None:
        targets, itl, ttft = self.targets, self.itl_quantile, self.ttft_quantile
        if targets.itl_seconds is not None:
            if itl is None:
                return None
            if itl > targets.itl_seconds:
                return self._tighten(_missed("ITL", targets.quantile, itl, targets.itl_seconds))
            if itl >= HEADROOM * targets.itl_seconds:
                return None
        if targets.ttft_seconds is not None and ttft is not None and ttft > targets.ttft_seconds:
            return self._relax(_missed("TTFT", targets.quantile, ttft, targets.ttft_seconds))
        if queue_grew:
            return self._relax(f"queue grew to {self._queued} prompt tokens")
        return None

    def _tighten(self, why: str) -> Decision | None:
        b, now = self.bounds, self.limits
        budget, interval, seqs = _limits(now)
        budget_floor = max(b.min_token_budget, min(seqs, b.max_token_budget))
        if budget > budget_floor:
            new = max(budget_floor, int(budget * TIGHTEN_BUDGET))
            return Decision(replace(now, max_num_batched_tokens=new), "tighten", "token_budget", why)
        if interval < b.max_admission_interval:
            return Decision(
                replace(now, admission_interval=interval + 1), "tighten", "admission_interval", why
            )
        if seqs > b.min_num_seqs:
            new = max(b.min_num_seqs, int(seqs * TIGHTEN_SEQS))
            return Decision(replace(now, max_num_seqs=new), "tighten", "num_seqs", why)
        return None

    def _relax(self, why: str) -> Decision | None:
        b, now = self.bounds, self.limits
        budget, interval, seqs = _limits(now)
        if seqs < b.max_num_seqs:
            new = min(b.max_num_seqs, max(seqs + 1, math.ceil(seqs * RELAX)))
            budget = max(budget, min(new, b.max_token_budget))  # still a decode for every sequence
            return Decision(
                replace(now, max_num_seqs=new, max_num_batched_tokens=budget), "relax", "num_seqs", why
            )
        if interval > b.min_admission_interval:
            return Decision(replace(now, admission_interval=interval - 1), "relax", "admission_interval", why)
        if budget < b.max_token_budget:
            new = min(b.max_token_budget, max(budget + 1, math.ceil(budget * RELAX)))
            return Decision(replace(now, max_num_batched_tokens=new), "relax", "token_budget", why)
        return None


def _limits(limits: BatchingLimits) -> tuple[int, int, int]:
    budget, interval, seqs = limits.max_num_batched_tokens, limits.admission_interval, limits.max_num_seqs
    assert budget is not None and interval is not None and seqs is not None, "every limit must be set"
    return budget, interval, seqs


def _missed(name: str, quantile: float, seconds: float, target: float) -> str:
    return f"{name} p{quantile * 100:g} {seconds * 1000:.3g} ms > target {target * 1000:g} ms"
