"""`SloBatching`: SLO-driven batching in a running server (`--slo-ttft-ms`, `--slo-itl-ms`).

Rules:
- On when either target is set; it then needs an engine that can change its batching limits at run
  time (`set_batching`, the native drivers): with another one (TensorRT-LLM) the server fails at start
  with `SloUnsupportedError`, naming the flags, rather than ignore them.
- `attach` (once the engine runs) reads the engine's limits and their ceilings, and sets the bounds:
  token budget in [--slo-min-token-budget, the engine's --max-num-batched-tokens], sequence cap in
  [--slo-min-num-seqs, its --max-num-seqs] (a floor above its ceiling is lowered to it, with a
  warning), admission interval in [--slo-min-admission-interval, --slo-max-admission-interval].
- The server feeds every first token and inter-token gap (`observe_ttft`, `observe_itl`, from
  kiln.serve.generation); every --slo-interval-seconds the controller (kiln.serve.slo_controller, where
  the rule is) decides from them and from the prompt tokens waiting for their first token, and a change
  goes to the engine at once, one log line each. The engine's limits are set again whenever its report
  differs from the controller's (an engine restarted meanwhile).
- Each period also reads the engine's stats into the drain rate (kiln.serve.slo_predict) that admission
  uses to refuse a request whose deadline its predicted time to first token exceeds.
- Metrics (in the app's registry): `kiln_slo_admission_interval`, `kiln_slo_token_budget`,
  `kiln_slo_max_num_seqs` (the limits in force), `kiln_slo_ttft_quantile_seconds`,
  `kiln_slo_itl_quantile_seconds` (as the last decision saw them; NaN: too few observations),
  `kiln_slo_prefill_tokens_per_second` (the drain rate; NaN: not measured), and the counter
  `kiln_slo_adjustments_total{direction, lever}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from prometheus_client import Counter, Gauge

from kiln.clients.protocol import EngineClient
from kiln.engine.info import BatchingLimits
from kiln.errors import KilnError
from kiln.serve.admission import Admission
from kiln.serve.metrics import ServerMetrics
from kiln.serve.settings import ServerSettings
from kiln.serve.slo_controller import BatchingBounds, SloController, SloTargets
from kiln.serve.slo_predict import DrainMeter, TtftForecaster

logger = logging.getLogger("kiln.serve.slo")


class SloUnsupportedError(KilnError):
    """SLO targets were given for an engine that cannot change its batching limits at run time."""


def can_set_batching(engine: EngineClient) -> bool:
    explicit = getattr(engine, "can_set_batching", None)  # a LoadingEngine says for its loaded engine
    return bool(explicit) if explicit is not None else hasattr(engine, "set_batching")


class SloBatching:
    """The controller of one app and its engine (see the module rules): `attach`, then `start` its
    periods; `stop` ends them. Its metrics are registered in `metrics.registry` when it is built."""

    def __init__(self, settings: ServerSettings, admission: Admission, metrics: ServerMetrics) -> None:
        self.targets = SloTargets(
            _seconds(settings.slo_ttft_ms), _seconds(settings.slo_itl_ms), settings.slo_quantile
        )
        self.settings = settings
        self.admission = admission
        self.window_periods = max(1, round(settings.slo_window_seconds / settings.slo_interval_seconds))
        self.controller: SloController | None = None  # once attached
        self.forecaster = TtftForecaster()
        self.meter = DrainMeter(self.window_periods)
        self._engine: Any = None
        self._task: asyncio.Future[None] | None = None
        r = metrics.registry
        self.interval_gauge = Gauge("kiln_slo_admission_interval", "Admission interval in force.", registry=r)
        self.budget_gauge = Gauge("kiln_slo_token_budget", "Token budget per step in force.", registry=r)
        self.seqs_gauge = Gauge("kiln_slo_max_num_seqs", "Running-sequence cap in force.", registry=r)
        quantile = f"p{settings.slo_quantile * 100:g}"
        self.ttft_gauge = Gauge(
            "kiln_slo_ttft_quantile_seconds",
            f"Windowed {quantile} time to first token the SLO controller last saw (NaN: too few).",
            registry=r,
        )
        self.itl_gauge = Gauge(
            "kiln_slo_itl_quantile_seconds",
            f"Windowed {quantile} inter-token latency the SLO controller last saw (NaN: too few).",
            registry=r,
        )
        self.rate_gauge = Gauge(
            "kiln_slo_prefill_tokens_per_second",
            "Prompt tokens per second the engine computes while requests wait (NaN: not measured yet).",
            registry=r,
        )
        self.adjustments = Counter(
            "kiln_slo_adjustments",
            "Changes of the batching limits by the SLO controller.",
            ["direction", "lever"],
            registry=r,
        )
        for gauge in (self.interval_gauge, self.budget_gauge, self.seqs_gauge, self.ttft_gauge):
            gauge.set(math.nan)  # until attached and measured
        self.itl_gauge.set(math.nan)
        self.rate_gauge.set(math.nan)

    @classmethod
    def from_settings(
        cls, settings: ServerSettings, admission: Admission, metrics: ServerMetrics
    ) -> SloBatching | None:
        """The SLO runtime when a target is set, else None."""
        if settings.slo_ttft_ms is None and settings.slo_itl_ms is None:
            return None
        return cls(settings, admission, metrics)

    # -- observations (the server's event loop) -------------------------------------------------------
    def observe_ttft(self, seconds: float) -> None:
        if self.controller is not None:
            self.controller.observe_ttft(seconds)

    def observe_itl(self, seconds: float, num_tokens: int) -> None:
        if self.controller is not None:
            self.controller.observe_itl(seconds, num_tokens)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def attach(self, engine: EngineClient) -> None:
        """Take control of a started engine's batching limits (see the rules); SloUnsupportedError when
        it cannot change them."""
        stats = engine.stats()
        now, ceiling = stats.batching, stats.batching_ceiling
        if not can_set_batching(engine) or now is None or ceiling is None:
            backend = engine.model_info.backend
            raise SloUnsupportedError(
                "--slo-ttft-ms and --slo-itl-ms need an engine that can change its batching limits while "
                f"it runs (the native engine); this {backend!r} engine cannot. Serve without them."
            )
        s = self.settings
        assert ceiling.max_num_batched_tokens is not None and ceiling.max_num_seqs is not None
        bounds = BatchingBounds(
            min_admission_interval=s.slo_min_admission_interval,
            max_admission_interval=s.slo_max_admission_interval,
            min_token_budget=_floor(
                "--slo-min-token-budget", s.slo_min_token_budget, ceiling.max_num_batched_tokens
            ),
            max_token_budget=ceiling.max_num_batched_tokens,
            min_num_seqs=_floor("--slo-min-num-seqs", s.slo_min_num_seqs, ceiling.max_num_seqs),
            max_num_seqs=ceiling.max_num_seqs,
        )
        assert now.admission_interval is not None
        interval = min(
            max(now.admission_interval, bounds.min_admission_interval), bounds.max_admission_interval
        )
        limits = BatchingLimits(interval, now.max_num_batched_tokens, now.max_num_seqs)
        self.controller = SloController(self.targets, bounds, limits, window_periods=self.window_periods)
        self._engine = engine
        await engine.set_batching(limits)  # type: ignore[attr-defined]
        self._show(limits)
        self.admission.forecaster = self.forecaster
        logger.info(
            "SLO batching on: targets %s at p%g; budget %d..%d, seqs %d..%d, admission interval %d..%d",
            _targets_text(self.targets),
            s.slo_quantile * 100,
            bounds.min_token_budget,
            bounds.max_token_budget,
            bounds.min_num_seqs,
            bounds.max_num_seqs,
            bounds.min_admission_interval,
            bounds.max_admission_interval,
        )

    def start(self) -> None:
        """Run the controller in the background (after `attach`)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.slo_interval_seconds)
            try:
                await self.period()
            except Exception:  # the engine down or restarting: its supervisor deals with that
                logger.warning("SLO controller period failed; trying again next period", exc_info=True)

    async def period(self) -> None:
        """One period: measure the drain rate, decide, apply (see the rules)."""
        controller, engine = self.controller, self._engine
        assert controller is not None, "attach first"
        stats = engine.stats()
        self.forecaster.rate = self.meter.read(stats)
        rate = self.forecaster.rate
        self.rate_gauge.set(math.nan if rate is None else rate.prefill_tokens_per_second)
        if stats.batching is not None and stats.batching != controller.limits:
            await engine.set_batching(controller.limits)
        decision = controller.tick(self.admission.waiting_prompt_tokens)
        self.ttft_gauge.set(_or_nan(controller.ttft_quantile))
        self.itl_gauge.set(_or_nan(controller.itl_quantile))
        if decision is None:
            return
        await engine.set_batching(decision.limits)
        self._show(decision.limits)
        self.adjustments.labels(direction=decision.direction, lever=decision.lever).inc()
        limits = decision.limits
        logger.info(
            "SLO %s %s: %s -> admission interval %s, token budget %s, seqs %s",
            decision.direction,
            decision.lever,
            decision.reason,
            limits.admission_interval,
            limits.max_num_batched_tokens,
            limits.max_num_seqs,
        )

    def _show(self, limits: BatchingLimits) -> None:
        self.interval_gauge.set(_or_nan(limits.admission_interval))
        self.budget_gauge.set(_or_nan(limits.max_num_batched_tokens))
        self.seqs_gauge.set(_or_nan(limits.max_num_seqs))
        self.forecaster.admission_interval = limits.admission_interval or 1


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _floor(flag: str, floor: int, ceiling: int) -> int:
    if floor <= ceiling:
        return floor
    logger.warning("%s %d is above the engine's %d; using %d", flag, floor, ceiling, ceiling)
    return ceiling


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _targets_text(targets: SloTargets) -> str:
    parts = [
        f"{name} {seconds * 1000:g} ms"
        for name, seconds in (("TTFT", targets.ttft_seconds), ("ITL", targets.itl_seconds))
        if seconds is not None
    ]
    return ", ".join(parts)
