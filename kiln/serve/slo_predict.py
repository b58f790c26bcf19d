"""Predicted time to first token: how long the queue ahead of a new request takes to drain.

Rules:
- The drain rate is measured, not assumed: `DrainMeter` reads the engine's cumulative `EngineStats`
  once per controller period and, over its last `num_periods` readings, divides the prompt tokens
  computed in backlogged steps (steps after whose scheduling requests still waited, so the engine, not
  the arrivals, set the pace) by those steps' seconds; the mean step time is busy seconds over steps.
  A period without backlog leaves the last rate standing; before any backlog there is none (cold
  start), and nothing is predicted. Counters that go backwards (a restarted engine) start it over.
- `predict_ttft`: a request waits for the next admission (at most `admission_interval` steps), then for
  the prompt tokens queued ahead of it and its own to be computed at the drain rate.
- `retry_after_seconds`: the seconds until the queue ahead has drained, rounded up, at least 1.
- `TtftForecaster` is what admission asks (kiln.serve.admission): no rate, no forecast, never a refusal.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from kiln.engine.info import EngineStats

# Backlogged seconds a rate needs before it is believed: less is a step or two, mostly noise.
MIN_BACKLOG_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class DrainRate:
    """How fast the engine works through a queue, as last measured."""

    prefill_tokens_per_second: float
    step_seconds: float


@dataclass(frozen=True, slots=True)
class Forecast:
    ttft_seconds: float  # predicted time to first token of the new request
    retry_after_seconds: int  # until the queue ahead of it has drained
    rate: DrainRate


def predict_ttft(
    ahead_tokens: int, prompt_tokens: int, rate: DrainRate, admission_interval: int = 1
) -> float:
    """Seconds until a request of `prompt_tokens` prompt tokens, behind `ahead_tokens` queued ones,
    gets its first token (see the module rules)."""
    prefill = (ahead_tokens + prompt_tokens) / rate.prefill_tokens_per_second
    return admission_interval * rate.step_seconds + prefill


def retry_after_seconds(ahead_tokens: int, rate: DrainRate) -> int:
    """Whole seconds until `ahead_tokens` queued prompt tokens are computed, at least 1."""
    return max(1, math.ceil(ahead_tokens / rate.prefill_tokens_per_second))


class TtftForecaster:
    """The measured `rate` (None: not measured yet) and the admission interval in force."""

    def __init__(self) -> None:
        self.rate: DrainRate | None = None
        self.admission_interval = 1

    def forecast(self, ahead_tokens: int, prompt_tokens: int) -> Forecast | None:
        rate = self.rate
        if rate is None or rate.prefill_tokens_per_second <= 0:
            return None
        ttft = predict_ttft(ahead_tokens, prompt_tokens, rate, self.admission_interval)
        return Forecast(ttft, retry_after_seconds(ahead_tokens, rate), rate)


@dataclass(frozen=True, slots=True)
class _Reading:
    backlog_seconds: float
    backlog_prefill_tokens: int
    busy_seconds: float
    num_steps: int


class DrainMeter:
    """The drain rate over the last `num_periods` readings of `EngineStats` (see the module rules)."""

    def __init__(self, num_periods: int) -> None:
        self._readings: deque[_Reading] = deque(maxlen=max(2, num_periods + 1))
        self.rate: DrainRate | None = None

    def read(self, stats: EngineStats) -> DrainRate | None:
        """Take one reading; returns the rate now standing."""
        reading = _Reading(
            stats.backlog_seconds, stats.backlog_prefill_tokens, stats.busy_seconds, stats.num_steps
        )
        if self._readings and _went_back(self._readings[-1], reading):
            self._readings.clear()  # a new engine: its counters started over
        self._readings.append(reading)
        first, last = self._readings[0], reading
        seconds = last.backlog_seconds - first.backlog_seconds
        tokens = last.backlog_prefill_tokens - first.backlog_prefill_tokens
        steps = last.num_steps - first.num_steps
        if seconds >= MIN_BACKLOG_SECONDS and tokens > 0 and steps > 0:
            step_seconds = (last.busy_seconds - first.busy_seconds) / steps
            self.rate = DrainRate(tokens / seconds, step_seconds)
        return self.rate


def _went_back(before: _Reading, after: _Reading) -> bool:
    return after.num_steps < before.num_steps or after.backlog_seconds < before.backlog_seconds
