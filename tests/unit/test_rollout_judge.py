"""The canary verdict: errors judged as they come, latency when the step is over, never on no evidence."""

from __future__ import annotations

from kiln.serve.rollout_judge import CanaryPolicy, LiveWindow, WindowSummary, judge, quantile

POLICY = CanaryPolicy(min_requests=10, max_error_rate=0.01, max_latency_ratio=1.5)
STABLE = WindowSummary(requests=100, errors=0, ttft_p99=0.100, itl_p99=0.020)


def _canary(
    requests: int, errors: int = 0, ttft: float | None = 0.1, itl: float | None = 0.02
) -> WindowSummary:
    return WindowSummary(requests=requests, errors=errors, ttft_p99=ttft, itl_p99=itl)


def test_quantile_is_nearest_rank() -> None:
    assert quantile([], 0.99) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert quantile([float(i) for i in range(1, 11)], 0.99) == 10.0


def test_waits_for_time_and_requests() -> None:
    assert judge(_canary(3), STABLE, POLICY, time_is_up=True).action == "wait"
    assert judge(_canary(50), STABLE, POLICY, time_is_up=False).action == "wait"
    assert judge(_canary(10), STABLE, POLICY, time_is_up=True).action == "pass"


def test_errors_roll_back_before_the_step_ends() -> None:
    assert judge(_canary(2, errors=2), STABLE, POLICY, time_is_up=False).action == "wait"  # too few to say
    verdict = judge(_canary(3, errors=3), STABLE, POLICY, time_is_up=False)
    assert (verdict.action, verdict.reason) == ("rollback", "errors")
    assert "3 of 3 requests failed" in verdict.detail


def test_error_rate_is_relative_to_stable() -> None:
    noisy_stable = WindowSummary(requests=100, errors=5, ttft_p99=0.1, itl_p99=0.02)
    assert judge(_canary(100, errors=5), noisy_stable, POLICY, time_is_up=True).action == "pass"
    assert judge(_canary(100, errors=7), noisy_stable, POLICY, time_is_up=True).action == "rollback"


def test_latency_needs_ratio_and_slack() -> None:
    # 0.1 * 1.5 + 0.005 = 0.155 s allowed
    assert judge(_canary(10, ttft=0.155), STABLE, POLICY, time_is_up=True).action == "pass"
    verdict = judge(_canary(10, ttft=0.156), STABLE, POLICY, time_is_up=True)
    assert (verdict.action, verdict.reason) == ("rollback", "ttft")
    verdict = judge(_canary(10, itl=0.040), STABLE, POLICY, time_is_up=True)
    assert (verdict.action, verdict.reason) == ("rollback", "itl")
    tiny = WindowSummary(requests=10, errors=0, ttft_p99=1e-5, itl_p99=1e-5)
    assert judge(_canary(10, ttft=0.004, itl=0.004), tiny, POLICY, time_is_up=True).action == "pass"


def test_a_metric_stable_has_no_samples_of_is_not_compared() -> None:
    quiet = WindowSummary(requests=0, errors=0, ttft_p99=None, itl_p99=None)
    assert judge(_canary(10, ttft=9.0, itl=9.0), quiet, POLICY, time_is_up=True).action == "pass"


def test_live_window_counts_and_spreads_a_delta_over_its_tokens() -> None:
    window = LiveWindow()
    window.observe_output(0.5, None, 1)
    window.observe_output(None, 0.03, 3)
    window.finish(ok=True)
    window.finish(ok=False)
    summary = window.summary()
    assert (summary.requests, summary.errors, summary.ttft_p99) == (2, 1, 0.5)
    assert window.itl == [0.01, 0.01, 0.01]
    window.reset()
    assert window.summary() == WindowSummary(0, 0, None, None)
