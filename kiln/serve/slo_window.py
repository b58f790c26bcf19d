"""`LatencyWindow`: quantiles of the latencies observed over the last few controller periods.

Rules:
- Observations land in the current slot; `roll()` closes it and opens the next, dropping the oldest
  beyond `num_slots`. So the window is the last `num_slots` periods, whatever the load, and a quantile
  can be asked over the newest few slots only (the SLO controller asks for those since its last change).
- A slot keeps weights per logarithmic bucket (each `RESOLUTION` = 5% wider than the one below), not the
  values: an observation costs one `log` and one dict update on the event loop however many streams
  run, and a quantile costs the buckets present (a few hundred), not a sort of every observation.
- `quantile(q)` is the upper edge of the bucket where the cumulative weight reaches q of the total: at
  most 5% above the exact order statistic, never below it. Values under `FLOOR_SECONDS` share bucket 0.
- Weights: a delta of k tokens after a gap g is k inter-token observations of g / k (as the Prometheus
  histogram counts them), one bucket update of weight k.
"""

from __future__ import annotations

import math
from collections import deque

RESOLUTION = 0.05  # relative width of a bucket
FLOOR_SECONDS = 1e-5  # the lower edge of bucket 1
_LOG_STEP = math.log1p(RESOLUTION)


def _bucket(seconds: float) -> int:
    if seconds <= FLOOR_SECONDS:
        return 0
    return 1 + int(math.log(seconds / FLOOR_SECONDS) / _LOG_STEP)


def _upper_edge(bucket: int) -> float:
    return FLOOR_SECONDS * math.exp(bucket * _LOG_STEP)


class LatencyWindow:
    """The last `num_slots` periods of one latency's observations (see the module rules)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slots: deque[dict[int, float]] = deque([{}], maxlen=num_slots)

    def observe(self, seconds: float, weight: float = 1.0) -> None:
        if weight > 0 and seconds >= 0 and math.isfinite(seconds):
            slot = self._slots[-1]
            bucket = _bucket(seconds)
            slot[bucket] = slot.get(bucket, 0.0) + weight

    def roll(self) -> None:
        """Close the current slot and open a new one (the oldest beyond `num_slots` is dropped)."""
        self._slots.append({})

    def _merged(self, newest: int | None) -> dict[int, float]:
        slots = list(self._slots)[-newest:] if newest is not None else list(self._slots)
        merged: dict[int, float] = {}
        for slot in slots:
            for bucket, weight in slot.items():
                merged[bucket] = merged.get(bucket, 0.0) + weight
        return merged

    def count(self, newest: int | None = None) -> float:
        """The weight observed in the newest `newest` slots (None: all), the current one included."""
        if newest is not None and newest < 1:
            return 0.0
        return sum(self._merged(newest).values())

    def quantile(self, q: float, newest: int | None = None) -> float | None:
        """The q-quantile (0 < q <= 1) of the newest `newest` slots (None: all); None when empty."""
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q}")
        if newest is not None and newest < 1:
            return None
        merged = self._merged(newest)
        total = sum(merged.values())
        if total <= 0:
            return None
        needed = q * total
        seen = 0.0
        for bucket in sorted(merged):
            seen += merged[bucket]
            if seen >= needed * (1 - 1e-12):
                return _upper_edge(bucket)
        return _upper_edge(max(merged))
