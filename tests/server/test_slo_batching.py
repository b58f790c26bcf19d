"""SLO-driven batching in a running server: the flags, the controller moving the engine's limits, its
metrics, the clear refusal of an engine that cannot change its batching, and the 429 of a request whose
predicted time to first token exceeds its deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import GatedEngine, _Wrapper
from pydantic import ValidationError
from server_harness import open_tiny_engine, run_live_server, start_cli_server, wait_for

from kiln.clients.thread import AsyncEngine
from kiln.engine.info import BatchingLimits
from kiln.serve.settings import ServerSettings
from kiln.serve.slo import SloUnsupportedError
from kiln.serve.slo_predict import DrainRate

COMPLETIONS = "/v1/completions"
CEILING = BatchingLimits(1, 256, 8)


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample of /metrics; None when absent."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def engine(tiny_gqa_dir: Path) -> Iterator[AsyncEngine]:
    """Its own engine: the controller changes its limits (set back to the ceilings after each test)."""
    engine = open_tiny_engine(tiny_gqa_dir, max_num_batched_tokens=256, max_num_seqs=8)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(autouse=True)
def ceilings_again(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        asyncio.run(request.getfixturevalue("engine").set_batching(CEILING))


class GatedSloEngine(GatedEngine):
    """GatedEngine that can also set batching: requests wait before the engine, counted as queued."""

    async def set_batching(self, limits: BatchingLimits) -> None:
        await self.inner.set_batching(limits)


def test_the_controller_tightens_a_missed_itl_target_and_shows_it_in_metrics(engine: AsyncEngine) -> None:
    # An ITL target no engine meets (1 us): every period with enough tokens tightens, budget first.
    settings = {
        "slo_itl_ms": 0.001,
        "slo_ttft_ms": 60_000,
        "slo_interval_seconds": 0.05,
        "slo_min_token_budget": 16,
    }
    with run_live_server(engine, served_model_name="tiny", **settings) as server:
        url = server.url
        assert metric(url, "kiln_slo_token_budget") == 256
        assert metric(url, "kiln_slo_max_num_seqs") == 8
        assert metric(url, "kiln_slo_admission_interval") == 1
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 60, "ignore_eos": True}

        def tightened() -> bool:
            return (
                metric(url, "kiln_slo_adjustments_total", direction="tighten", lever="token_budget") or 0
            ) > 0

        deadline = time.monotonic() + 60
        while not tightened() and time.monotonic() < deadline:
            r = httpx.post(url + COMPLETIONS, json={**body, "stream": True}, timeout=30)
            assert r.status_code == 200
        assert tightened()
        budget = metric(url, "kiln_slo_token_budget")
        assert budget is not None and budget < 256
        assert engine.stats().batching is not None
        assert wait_for(
            lambda: engine.stats().batching.max_num_batched_tokens == metric(url, "kiln_slo_token_budget")
        )  # type: ignore[union-attr]
        itl = metric(url, "kiln_slo_itl_quantile_seconds")
        assert itl is not None  # NaN while too few observations: a float either way
        assert metric(url, "kiln_slo_prefill_tokens_per_second") is not None


def test_deadline_429_when_the_predicted_ttft_exceeds_it(engine: AsyncEngine) -> None:
    gated = GatedSloEngine(engine)
    # A period long enough never to come: the drain rate stays the one the test sets.
    with run_live_server(gated, served_model_name="tiny", slo_itl_ms=50, slo_interval_seconds=3600) as server:
        url, state = server.url, server.state
        prompt = list(range(10, 160))  # 150 tokens
        held: dict[str, Any] = {}

        def blocker() -> None:  # no deadline: admitted, then held at the gate, its prompt queued
            held["response"] = httpx.post(
                url + COMPLETIONS, json={"model": "tiny", "prompt": prompt, "max_tokens": 2}, timeout=60
            )

        # Cold start (no drain rate measured): a deadline is never refused for a prediction.
        r = httpx.post(
            url + COMPLETIONS, json={"model": "tiny", "prompt": [5], "max_tokens": 1, "timeout": 0.001}
        )
        assert r.status_code != 429

        state.slo.forecaster.rate = DrainRate(prefill_tokens_per_second=100.0, step_seconds=0.01)
        thread = threading.Thread(target=blocker)
        thread.start()
        try:
            assert wait_for(lambda: state.admission.waiting_prompt_tokens == 150)
            late = {"model": "tiny", "prompt": prompt[:50], "max_tokens": 2, "timeout": 2}
            r = httpx.post(url + COMPLETIONS, json=late)  # (150 + 50) / 100 + 0.01 s > 2 s
            assert r.status_code == 429, r.text
            error = r.json()["error"]
            assert error["code"] == "deadline_unmeetable" and error["type"] == "rate_limit_error"
            assert "150 prompt tokens queued ahead of its 50" in error["message"]
            assert (
                "about 2.0 s for its first token" in error["message"] and "100 tokens/s" in error["message"]
            )
            assert r.headers["Retry-After"] == "2"  # 150 tokens ahead at 100 tokens/s: 1.5 s, rounded up
            r = httpx.post(url + COMPLETIONS, json=late, headers={"X-Request-Timeout": "1"})
            assert r.status_code == 429 and "1.0 s left" in r.json()["error"]["message"]
            assert state.admission.waiting_prompt_tokens == 150  # refused ones never queued
        finally:
            gated.open()
            thread.join(timeout=60)
        assert held["response"].status_code == 200
        ok = httpx.post(
            url + COMPLETIONS, json={"model": "tiny", "prompt": prompt[:50], "max_tokens": 2, "timeout": 5}
        )
        assert ok.status_code == 200, ok.text  # 0.5 s predicted with nothing ahead


def test_an_engine_that_cannot_set_batching_fails_the_start_clearly(engine: AsyncEngine) -> None:
    # As the TensorRT-LLM client: an EngineClient without set_batching.
    slo_server = run_live_server(
        _Wrapper(engine), served_model_name="tiny", slo_ttft_ms=500, drain_timeout_seconds=0
    )
    with (
        pytest.raises(SloUnsupportedError, match=r"--slo-ttft-ms and --slo-itl-ms need an engine"),
        slo_server,
    ):
        pass
    # Without SLO flags the same engine serves.
    with run_live_server(_Wrapper(engine), served_model_name="tiny") as server:
        assert metric(server.url, "kiln_slo_token_budget") is None
        assert server.state.admission.forecaster is None


def test_kiln_serve_slo_flags_over_the_engine_process(tiny_gqa_dir: Path) -> None:
    flags = ("--slo-itl-ms", "50", "--slo-quantile", "0.9", "--max-num-batched-tokens", "128")
    flags += ("--slo-min-token-budget", "512", "--slo-max-admission-interval", "4")
    proc, url, log = start_cli_server(tiny_gqa_dir, *flags)
    try:
        assert metric(url, "kiln_slo_token_budget") == 128
        assert metric(url, "kiln_slo_max_num_seqs") == 64
        r = httpx.post(
            url + COMPLETIONS, json={"model": "tiny", "prompt": [5, 6], "max_tokens": 4}, timeout=30
        )
        assert r.status_code == 200
    finally:
        proc.kill()
        proc.wait()
    text = "".join(log)
    assert "--slo-min-token-budget 512 is above the engine's 128; using 128" in text
    assert (
        "SLO batching on: targets ITL 50 ms at p90; budget 128..128, seqs 8..64, admission interval 1..4"
        in text
    )
    assert "Traceback" not in text


def test_slo_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="slo_quantile"):
        ServerSettings(slo_quantile=1.5)
    with pytest.raises(ValidationError, match="below --slo-min-admission-interval"):
        ServerSettings(slo_min_admission_interval=4, slo_max_admission_interval=2)
    assert ServerSettings().slo_ttft_ms is None and ServerSettings().slo_itl_ms is None  # off by default
