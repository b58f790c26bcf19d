"""The rollout's Prometheus metrics, read at scrape time from the rollout and its router.

- kiln_model_version_info{model, version, role}: 1 for each loaded version (role: stable, canary,
  retiring).
- kiln_canary_share: the share of new requests the canary gets (0 without one).
- kiln_rollout_step: the canary step running, from 1 (0 without one).
- kiln_rollout_transitions_total{state}: loading, checking, canary (each step), promoted, failed,
  rolled_back, unloaded.
- kiln_rollout_promotions_total; kiln_rollout_rollbacks_total{reason}: load_failed, check_failed,
  errors, ttft, itl, engine_down, admin.
- kiln_version_requests_total{version, outcome}: engine requests each version finished: ok, error,
  retried (failed on the canary, run again on the stable version), refused (the request's own fault).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from kiln.serve.rollout import Rollout
    from kiln.serve.versions import ServedVersion


class RolloutMetrics(Collector):
    def __init__(self, rollout: Rollout) -> None:
        self._rollout = rollout
        self.transitions: Counter[str] = Counter()
        self.rollbacks: Counter[str] = Counter()
        self.promotions = 0
        self.requests: Counter[tuple[int, str]] = Counter()

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    # --- what the rollout and router report -----------------------------------------------------------
    def transition(self, state: str) -> None:
        self.transitions[state] += 1

    def rolled_back(self, reason: str) -> None:
        self.rollbacks[reason] += 1

    def promoted(self) -> None:
        self.promotions += 1

    def request_ended(self, version: ServedVersion, outcome: str) -> None:
        self.requests[(version.number, outcome)] += 1

    # --- the scrape ----------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        rollout = self._rollout
        router = rollout.router
        info = GaugeMetricFamily(
            "kiln_model_version_info",
            "Loaded versions of the served model, by role.",
            labels=["model", "version", "role"],
        )
        for version in router.live:
            info.add_metric([rollout.repository.model, str(version.number), version.role], 1)
        yield info
        yield GaugeMetricFamily(
            "kiln_canary_share", "Share of new requests the canary gets.", router.canary_share
        )
        step = rollout.step + 1 if rollout.step is not None and router.canary is not None else 0
        yield GaugeMetricFamily("kiln_rollout_step", "The canary step running, from 1 (0: none).", step)
        transitions = CounterMetricFamily(
            "kiln_rollout_transitions", "Rollout state changes, by the state entered.", labels=["state"]
        )
        for state, count in sorted(self.transitions.items()):
            transitions.add_metric([state], count)
        yield transitions
        yield CounterMetricFamily("kiln_rollout_promotions", "Canaries promoted to stable.", self.promotions)
        rollbacks = CounterMetricFamily(
            "kiln_rollout_rollbacks", "New versions failed or rolled back, by reason.", labels=["reason"]
        )
        for reason, count in sorted(self.rollbacks.items()):
            rollbacks.add_metric([reason], count)
        yield rollbacks
        requests = CounterMetricFamily(
            "kiln_version_requests",
            "Engine requests finished on each version, by outcome.",
            labels=["version", "outcome"],
        )
        for (number, outcome), count in sorted(self.requests.items()):
            requests.add_metric([str(number), outcome], count)
        yield requests
