"""Prometheus metrics of one app, in its own `CollectorRegistry` (tests build many apps in one process).

Two sources:
- per-request observations the server makes (`observe_*`): outcomes, latencies, token counts;
- engine load read from `EngineClient.stats()` at scrape time (running/waiting requests, KV usage,
  prefix-cache hit rate, preemptions), so /metrics never shows a stale copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.engine.info import EngineStats
from kiln.engine.outputs import RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], waiting_in_server: Callable[[], int]) -> None:
        self._stats = stats
        self._waiting_in_server = waiting_in_server

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("kiln_num_requests_running", "Requests the engine is running.", s.num_running)
        yield GaugeMetricFamily("kiln_num_requests_waiting", "Requests queued in the engine.", s.num_waiting)
        yield GaugeMetricFamily(
            "kiln_num_requests_waiting_first_token",
            "Requests admitted by the server that have no output yet (the 429 limit applies to these).",
            self._waiting_in_server(),
        )
        yield GaugeMetricFamily(
            "kiln_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", s.kv_usage
        )
        yield GaugeMetricFamily(
            "kiln_kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total
        )
        yield GaugeMetricFamily(
            "kiln_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up.",
            s.prefix_hit_rate,
        )
        yield CounterMetricFamily(
            "kiln_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "kiln_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits
        )
        yield CounterMetricFamily(
            "kiln_num_preemptions", "Requests preempted since start.", s.num_preemptions
        )
        yield CounterMetricFamily("kiln_engine_steps", "Model steps run since start.", s.num_steps)
        yield CounterMetricFamily(
            "kiln_engine_step_sequences",
            "Sequences computed, summed over steps (divided by kiln_engine_steps: the mean batch).",
            s.num_step_seqs,
        )
        yield CounterMetricFamily(
            "kiln_engine_step_tokens", "Tokens computed, summed over steps.", s.num_step_tokens
        )
        yield CounterMetricFamily(
            "kiln_kernel_compiles",
            "Triton kernel variants the engine's process built since start (from the disk cache or "
            "compiled); after start-up each one stalled every running stream.",
            s.kernel_compiles,
        )
        yield CounterMetricFamily(
            "kiln_kernel_compile_seconds",
            "Seconds spent building those kernel variants.",
            s.kernel_compile_seconds,
        )


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], waiting_in_server: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "kiln_http_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.requests = Counter(
            "kiln_requests",
            "Generation requests by how they ended: stop, length, abort (engine), cancelled (client gone), "
            "timeout (past its deadline), error.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "kiln_time_to_first_token_seconds",
            "Arrival to first output.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "kiln_inter_token_latency_seconds",
            "Time between consecutive outputs of a request, per generated token.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "kiln_e2e_request_latency_seconds",
            "Arrival to last output.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # A finished engine request's life in phases, from its RequestMetrics (the native engine's times;
        # time.monotonic is one clock for the server and the engine's process on the same host).
        phases = {
            "intake": "The server's arrival of a request (its handler) to the engine's: admission and the "
            "hand-over to the engine, waiting for the step the engine is in.",
            "queue": "Engine arrival to first scheduled: waiting in the engine's queue.",
            "prefill": "First scheduled to first token: the prompt's computation, all its chunks.",
            "decode": "First token to last token.",
        }
        self.request_phases = {
            phase: Histogram(f"kiln_request_{phase}_time_seconds", doc, buckets=_LATENCY_BUCKETS, registry=r)
            for phase, doc in phases.items()
        }
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated.", registry=r)
        self.engine_restarts = Counter(
            "kiln_engine_restarts",
            "Times the engine was restarted after it died or stopped answering.",
            registry=r,
        )
        r.register(_EngineCollector(stats, waiting_in_server))

    def observe_http(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        """A delta of `num_tokens` tokens arrived `seconds` after the previous one."""
        if num_tokens > 0:
            per_token = seconds / num_tokens
            for _ in range(num_tokens):
                self.inter_token_latency.observe(per_token)

    def observe_phases(self, server_arrival: float, metrics: RequestMetrics) -> None:
        """A finished engine request's phases (each that both its ends were recorded for)."""
        times = (
            server_arrival,
            metrics.arrival_time,
            metrics.first_scheduled_time,
            metrics.first_token_time,
            metrics.last_token_time,
        )
        for (start, end), histogram in zip(
            itertools.pairwise(times), self.request_phases.values(), strict=True
        ):
            if start is not None and end is not None:
                histogram.observe(max(0.0, end - start))

    def observe_finished(
        self,
        *,
        endpoint: str,
        outcome: str,
        prompt_tokens: int,
        generated_tokens: int,
        ttft: float | None,
        e2e: float,
    ) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        self.e2e_latency.observe(e2e)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
