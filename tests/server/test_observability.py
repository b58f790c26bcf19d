"""Prometheus metrics, the per-request JSON log line, and the info endpoints."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from server_harness import LiveServer, run_live_server

from kiln.clients.thread import AsyncEngine
from kiln.engine.info import EngineStats
from kiln.engine.outputs import RequestMetrics
from kiln.serve.metrics import ServerMetrics
from kiln.version import __version__

CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "secret prompt"}],
    "max_tokens": 3,
    "ignore_eos": True,
}


def request_lines(caplog: pytest.LogCaptureFixture, event: str = "request") -> list[dict]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kiln.request"]
    return [line for line in lines if line["event"] == event]


def test_metrics_cover_the_issue_list(server: LiveServer) -> None:
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'kiln_requests_total{endpoint="chat",outcome="length"}',
        "kiln_time_to_first_token_seconds_count",
        "kiln_inter_token_latency_seconds_count",
        "kiln_e2e_request_latency_seconds_count",
        "kiln_request_intake_time_seconds_count",
        "kiln_request_queue_time_seconds_count",
        "kiln_request_prefill_time_seconds_count",
        "kiln_request_decode_time_seconds_count",
        "kiln_prompt_tokens_total",
        "kiln_generation_tokens_total",
        "kiln_num_requests_running",
        "kiln_num_requests_waiting",
        "kiln_kv_cache_usage_ratio",
        "kiln_prefix_cache_hit_rate",
        "kiln_num_preemptions_total",
        "kiln_engine_steps_total",
        "kiln_engine_step_sequences_total",
        "kiln_engine_step_tokens_total",
        "kiln_kernel_compiles_total",
        "kiln_kernel_compile_seconds_total",
        'kiln_http_requests_total{route="/v1/chat/completions",status="200"}',
    ):
        assert name in text, name
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert values["kiln_generation_tokens_total"] >= 3
    for phase in ("intake", "queue", "prefill", "decode"):  # the one request, each phase recorded
        assert values[f"kiln_request_{phase}_time_seconds_count"] == 1, phase
    assert values["kiln_kv_cache_blocks_total"] == server.engine.stats().kv_blocks_total
    assert values["kiln_engine_steps_total"] >= 3  # the prompt, then a decode per token after the first
    assert values["kiln_engine_step_sequences_total"] >= values["kiln_engine_steps_total"]


def test_one_json_log_line_per_request_without_the_prompt(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kiln")
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "log-1"})
    assert r.status_code == 200
    lines = [x for x in request_lines(caplog) if x["http_request_id"] == "log-1"]
    assert len(lines) == 1
    assert lines[0]["request_id"] == r.json()["id"]
    line = lines[0]
    assert line["outcome"] == "length" and line["completion_tokens"] == 3
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["ttft_seconds"] is not None and line["e2e_seconds"] >= line["ttft_seconds"]
    assert "secret prompt" not in json.dumps(line)


def test_user_and_metadata_go_into_the_log_line(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln")
    tags = {"user": "user-42", "metadata": {"team": "search", "run": "7"}}
    chat = httpx.post(
        f"{server.url}/v1/chat/completions", json={**CHAT, **tags}, headers={"X-Request-Id": "t-1"}
    )
    completion = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "x", "max_tokens": 1, "user": "user-43"},
        headers={"X-Request-Id": "t-2"},
    )
    assert chat.status_code == completion.status_code == 200
    lines = {x["http_request_id"]: x for x in request_lines(caplog)}
    assert lines["t-1"]["user"] == "user-42" and lines["t-1"]["metadata"] == tags["metadata"]
    assert lines["t-2"]["user"] == "user-43" and "metadata" not in lines["t-2"]
    assert not any("ignoring unknown fields" in r.getMessage() for r in caplog.records)


def test_rejected_requests_log_one_line_too(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln")
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={**CHAT, "top_p": 7}, headers={"X-Request-Id": "bad-1"}
    )
    assert r.status_code == 400
    lines = [x for x in request_lines(caplog, "rejected") if x["http_request_id"] == "bad-1"]
    assert lines == [
        {
            "event": "rejected",
            "http_request_id": "bad-1",
            "method": "POST",
            "path": "/v1/chat/completions",
            "status": 400,
            "code": "invalid_value",
        }
    ]


def test_log_prompts_when_asked(tiny_engine: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln")
    with run_live_server(tiny_engine, served_model_name="tiny", log_prompts=True) as live:
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "secret prompt", "max_tokens": 2})
    line = request_lines(caplog)[-1]
    assert line["prompt"] == ["secret prompt"]
    assert line["output"] == [r.json()["choices"][0]["text"]]


def test_unknown_fields_are_logged(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiln")
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "frobnicate": 1}).status_code == 200
    assert any("frobnicate" in r.getMessage() for r in caplog.records if r.name == "kiln.serve")


def test_info_endpoints(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    version = httpx.get(f"{server.url}/version").json()
    assert version["version"] == __version__ and version["model"] == "tiny" and version["backend"] == "native"


def test_cors_when_origins_configured(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", cors_origins=["http://ui.example"]) as live:
        r = httpx.options(
            f"{live.url}/v1/chat/completions",
            headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.headers["access-control-allow-origin"] == "http://ui.example"


def test_configure_logging_writes_bare_request_lines_once(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.serve.runner import configure_logging

    configure_logging("info")
    configure_logging("info")  # idempotent
    caplog.set_level(logging.INFO, logger="kiln")
    logging.getLogger("kiln.request").info('{"event": "request", "x": 1}')
    logging.getLogger("kiln.serve").warning("plain")
    err = capsys.readouterr().err
    assert err.count('{"event": "request", "x": 1}') == 1
    assert '\n{"event": "request", "x": 1}\n' in "\n" + err  # bare: no prefix
    assert "WARNING kiln.serve: plain" in err
    assert any(r.name == "kiln.request" for r in caplog.records)  # still reaches the root logger


def test_the_request_line_is_built_only_when_info_is_on(caplog: pytest.LogCaptureFixture) -> None:
    from kiln.serve.request_log import RequestRecord, log_request

    record = RequestRecord("cmpl-1", "h1", "completions", "tiny", True, 1, 5, prompt=[[1, 2]], output=["x"])
    tagged = RequestRecord(
        "cmpl-2", "h2", "chat", "tiny", False, 1, 5, extra={"user": "u-7", "model_version": 3}
    )
    record.ttft_seconds, record.e2e_seconds = 0.0123456789, 0.5
    with caplog.at_level(logging.WARNING, logger="kiln.request"):
        assert log_request(record, include_prompt=False) is None
    with caplog.at_level(logging.INFO, logger="kiln.request"):
        line = log_request(record, include_prompt=False)
        with_prompt = json.loads(log_request(record, include_prompt=True) or "")
        tagged_line = json.loads(log_request(tagged, include_prompt=False) or "")
    data = json.loads(line or "")
    assert data["event"] == "request" and data["request_id"] == "cmpl-1" and data["ttft_seconds"] == 0.012346
    assert "prompt" not in data and "output" not in data and "extra" not in data and "user" not in data
    assert tagged_line["user"] == "u-7" and tagged_line["model_version"] == 3 and "extra" not in tagged_line
    assert with_prompt["prompt"] == [[1, 2]] and with_prompt["output"] == ["x"]
    assert [r.getMessage() for r in caplog.records if r.name == "kiln.request"] == [
        line,
        json.dumps(with_prompt),
        json.dumps(tagged_line),
    ]


def test_a_finished_requests_phases_are_the_gaps_between_its_times() -> None:
    metrics = ServerMetrics(EngineStats, lambda: 0)
    times = RequestMetrics(arrival_time=10.5, first_scheduled_time=10.625, first_token_time=11.0)
    times.last_token_time = 13.0
    metrics.observe_phases(10.0, times)
    # A backend that does not say when it scheduled (TensorRT-LLM): its queue and prefill are not guessed.
    metrics.observe_phases(
        20.0, RequestMetrics(arrival_time=20.25, first_token_time=21.0, last_token_time=22.0)
    )
    sample = metrics.registry.get_sample_value
    sums = {p: sample(f"kiln_request_{p}_time_seconds_sum") for p in ("intake", "queue", "prefill", "decode")}
    counts = {p: sample(f"kiln_request_{p}_time_seconds_count") for p in sums}
    assert sums == {"intake": 0.75, "queue": 0.125, "prefill": 0.375, "decode": 3.0}
    assert counts == {"intake": 2, "queue": 1, "prefill": 1, "decode": 2}
