"""SLO-driven batching's pure parts: the latency window, the controller's rule, the TTFT predictor and
admission's deadline refusal. No engine, no clock: observations are fed, periods ticked."""

from __future__ import annotations

import math

import pytest

from kiln.engine.info import BatchingLimits, EngineStats
from kiln.serve.admission import Admission
from kiln.serve.errors import OverloadedError
from kiln.serve.slo_controller import (
    HEADROOM,
    MIN_SAMPLES,
    BatchingBounds,
    Decision,
    SloController,
    SloTargets,
)
from kiln.serve.slo_predict import (
    DrainMeter,
    DrainRate,
    TtftForecaster,
    predict_ttft,
    retry_after_seconds,
)
from kiln.serve.slo_window import RESOLUTION, LatencyWindow

BOUNDS = BatchingBounds(
    min_admission_interval=1,
    max_admission_interval=3,
    min_token_budget=256,
    max_token_budget=2048,
    min_num_seqs=8,
    max_num_seqs=16,
)
CEILING = BatchingLimits(1, 2048, 16)


def controller(
    ttft_ms: float | None = 1000, itl_ms: float | None = 50, limits: BatchingLimits = CEILING
) -> SloController:
    targets = SloTargets(
        None if ttft_ms is None else ttft_ms / 1000, None if itl_ms is None else itl_ms / 1000, 0.99
    )
    return SloController(targets, BOUNDS, limits, window_periods=10)


def period(c: SloController, *, itl: float | None = None, ttft: float | None = None, queued: int = 0):
    """One period: MIN_SAMPLES observations of each latency given, then the tick's decision."""
    for _ in range(MIN_SAMPLES):
        if itl is not None:
            c.observe_itl(itl)
        if ttft is not None:
            c.observe_ttft(ttft)
    return c.tick(queued)


def limits_of(decision: Decision | None) -> tuple[int | None, int | None, int | None]:
    assert decision is not None
    limits = decision.limits
    return limits.admission_interval, limits.max_num_batched_tokens, limits.max_num_seqs


# -- the window -----------------------------------------------------------------------------------------
def test_window_quantile_is_at_most_one_bucket_above_the_order_statistic():
    window = LatencyWindow(4)
    values = [0.001 * i for i in range(1, 1001)]
    for v in values:
        window.observe(v)
    for q in (0.5, 0.9, 0.99):
        exact = values[math.ceil(q * len(values)) - 1]
        got = window.quantile(q)
        assert got is not None and exact <= got <= exact * (1 + RESOLUTION) * (1 + 1e-9)
    assert window.count() == len(values)


def test_window_weights_and_slots_roll_out():
    window = LatencyWindow(2)
    window.observe(0.010, weight=99)
    window.observe(1.0)
    assert window.quantile(0.99) == pytest.approx(0.010, rel=RESOLUTION)
    assert window.quantile(1.0) == pytest.approx(1.0, rel=RESOLUTION)
    window.roll()
    window.observe(0.5)
    assert window.count(newest=1) == 1 and window.quantile(0.5, newest=1) == pytest.approx(
        0.5, rel=RESOLUTION
    )
    window.roll()  # the first slot falls out of a 2-slot window
    assert window.count() == 1
    window.roll()
    assert window.quantile(0.99) is None and window.count() == 0


# -- the controller's rule ----------------------------------------------------------------------------------
def test_itl_over_target_tightens_budget_then_interval_then_seqs_and_stops_at_the_bounds():
    c = controller()
    steps = []
    while (decision := period(c, itl=0.2)) is not None:
        assert decision.direction == "tighten" and "ITL p99" in decision.reason
        steps.append((decision.lever, limits_of(decision)))
    assert steps == [
        ("token_budget", (1, 1024, 16)),
        ("token_budget", (1, 512, 16)),
        ("token_budget", (1, 256, 16)),
        ("admission_interval", (2, 256, 16)),
        ("admission_interval", (3, 256, 16)),
        ("num_seqs", (3, 256, 12)),
        ("num_seqs", (3, 256, 9)),
        ("num_seqs", (3, 256, 8)),
    ]
    assert c.limits == BatchingLimits(3, 256, 8)


def test_budget_never_goes_below_the_sequence_cap():
    bounds = BatchingBounds(1, 1, 16, 2048, 4, 64)
    c = SloController(SloTargets(None, 0.05), bounds, BatchingLimits(1, 2048, 64), window_periods=5)
    budgets = []
    while (decision := period(c, itl=0.2)) is not None and decision.lever == "token_budget":
        budgets.append(decision.limits.max_num_batched_tokens)
    assert budgets == [1024, 512, 256, 128, 64]  # not 32 or 16: 64 sequences decode in every step


def test_a_change_is_judged_only_by_observations_made_after_it():
    c = controller()
    assert period(c, itl=0.2) is not None
    assert c.tick(0) is None  # the slow ITLs from before the change no longer count
    assert c.itl_quantile is None
    c.observe_itl(0.2)  # too few to judge
    assert c.tick(0) is None
    assert period(c, itl=0.2) is not None


def test_hold_in_the_dead_band_and_without_itl_observations():
    c = controller(limits=BatchingLimits(2, 512, 16))
    assert period(c, itl=0.05 * (HEADROOM + 1) / 2, ttft=5.0) is None  # between headroom and target
    assert period(c, ttft=5.0) is None  # ITL unknown: no relaxing blind
    assert period(c, itl=0.01) is None  # headroom, but no pressure to relax
    assert c.limits == BatchingLimits(2, 512, 16)


def test_ttft_over_target_with_itl_headroom_relaxes_in_the_reverse_order_up_to_the_ceilings():
    c = controller(limits=BatchingLimits(3, 256, 8))
    steps = []
    while (decision := period(c, itl=0.01, ttft=5.0)) is not None:
        assert decision.direction == "relax" and "TTFT p99" in decision.reason
        steps.append((decision.lever, limits_of(decision)))
    levers = [lever for lever, _ in steps]
    assert levers == sorted(levers, key=["num_seqs", "admission_interval", "token_budget"].index)
    assert steps[0] == ("num_seqs", (3, 256, 10))
    assert ("admission_interval", (1, 256, 16)) in steps
    assert steps[-1] == ("token_budget", (1, 2048, 16))
    assert c.limits == CEILING


def test_a_growing_queue_relaxes_only_past_one_steps_budget():
    c = controller(ttft_ms=None, limits=BatchingLimits(1, 512, 16))
    assert period(c, itl=0.01, queued=100) is None  # the first reading: nothing to compare with
    assert period(c, itl=0.01, queued=400) is None  # grew, but one step takes it all
    decision = period(c, itl=0.01, queued=5000)
    assert decision is not None and decision.lever == "token_budget" and "queue grew" in decision.reason
    assert decision.limits.max_num_batched_tokens == 640
    assert period(c, itl=0.01, queued=4000) is None  # shrinking


def test_ttft_target_alone_only_relaxes():
    c = controller(itl_ms=None, limits=BatchingLimits(3, 2048, 16))
    assert period(c, ttft=0.1) is None
    assert limits_of(period(c, ttft=5.0)) == (2, 2048, 16)
    assert limits_of(period(c, ttft=5.0)) == (1, 2048, 16)
    assert period(c, ttft=5.0) is None  # nothing left to give


# -- the predictor -----------------------------------------------------------------------------------------
def test_predict_ttft_is_the_next_admission_plus_the_queue_at_the_drain_rate():
    rate = DrainRate(prefill_tokens_per_second=1000.0, step_seconds=0.02)
    assert predict_ttft(3000, 500, rate) == pytest.approx(0.02 + 3.5)
    assert predict_ttft(0, 100, rate, admission_interval=4) == pytest.approx(0.08 + 0.1)
    assert retry_after_seconds(3000, rate) == 3
    assert retry_after_seconds(3001, rate) == 4  # rounded up
    assert retry_after_seconds(0, rate) == 1  # never 0


def test_forecaster_without_a_rate_forecasts_nothing():
    forecaster = TtftForecaster()
    assert forecaster.forecast(10**6, 10**6) is None
    forecaster.rate = DrainRate(100.0, 0.01)
    forecaster.admission_interval = 2
    forecast = forecaster.forecast(250, 50)
    assert forecast is not None
    assert forecast.ttft_seconds == pytest.approx(0.02 + 3.0) and forecast.retry_after_seconds == 3


def _stats(steps: int, busy: float, backlog: float, tokens: int) -> EngineStats:
    return EngineStats(
        num_steps=steps, busy_seconds=busy, backlog_seconds=backlog, backlog_prefill_tokens=tokens
    )


def test_drain_meter_measures_backlogged_steps_keeps_the_last_rate_and_restarts():
    meter = DrainMeter(num_periods=2)
    assert meter.read(_stats(0, 0.0, 0.0, 0)) is None
    assert meter.read(_stats(10, 0.5, 0.0, 0)) is None  # busy, never backlogged: cold
    rate = meter.read(_stats(30, 1.5, 1.0, 4000))
    assert rate == DrainRate(prefill_tokens_per_second=4000.0, step_seconds=0.05)
    assert meter.read(_stats(40, 2.0, 1.0, 4000)) == rate  # the window still holds the backlog
    assert meter.read(_stats(50, 2.5, 1.0, 4000)) == rate
    assert meter.read(_stats(60, 3.0, 1.0, 4000)) == rate  # no backlog in the window: the last rate stands
    assert meter.read(_stats(1, 0.1, 0.0, 0)) == rate  # a restarted engine: counters start over
    assert meter.read(_stats(11, 0.6, 0.5, 500)) == DrainRate(1000.0, 0.05)


# -- admission's deadline refusal --------------------------------------------------------------------------
def _admission() -> Admission:
    admission = Admission(max_waiting_sequences=None, max_waiting_tokens=None, retry_after_seconds=1)
    admission.ready = True
    return admission


def test_deadline_refusal_when_the_predicted_ttft_exceeds_the_time_left():
    admission = _admission()
    admission.forecaster = TtftForecaster()
    first = admission.admit(1, 1100, prompt_tokens=1000, time_left=0.1)  # cold start: never refused
    assert admission.waiting_prompt_tokens == 1000
    admission.forecaster.rate = DrainRate(prefill_tokens_per_second=400.0, step_seconds=0.01)
    admission.admit(1, 200, prompt_tokens=100)  # no deadline: never refused
    with pytest.raises(OverloadedError) as refused:
        admission.admit(1, 300, prompt_tokens=200, time_left=2.0)  # (1100 + 200) / 400 + 0.01 s
    error = refused.value
    assert error.status_code == 429 and error.code == "deadline_unmeetable"
    assert error.headers == {"Retry-After": "3"}  # 1100 tokens ahead at 400/s: 2.75 s
    assert "3.3 s" in error.message and "2.0 s left" in error.message
    assert admission.waiting_prompt_tokens == 1100 and admission.waiting_requests == 2
    admission.admit(1, 300, prompt_tokens=200, time_left=5.0)  # enough time
    first.started()
    assert admission.waiting_prompt_tokens == 300
