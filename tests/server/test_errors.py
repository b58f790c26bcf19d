"""Every error the server returns is OpenAI error JSON with the right status, type, param and code."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from fakes import FailingEngine, GatedEngine
from server_harness import LiveServer, run_live_server, wait_for

from kiln.clients.thread import AsyncEngine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
        ({"stream": False, "stream_options": {"include_usage": False}}, "stream_options"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
    ],
)
def test_invalid_parameter_is_400_naming_it(http: httpx.Client, patch: dict, param: str) -> None:
    error = error_of(http.post("/v1/chat/completions", json={**CHAT, **patch}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_completion_prompt_errors(http: httpx.Client) -> None:
    base = {"model": "tiny", "max_tokens": 2}
    assert error_of(http.post("/v1/completions", json={**base, "prompt": [10**9]}), 400)["param"] == "prompt"
    assert error_of(http.post("/v1/completions", json={**base, "prompt": []}), 400)["param"] == "prompt"
    assert error_of(http.post("/v1/completions", json={**base, "prompt": 12}), 400)["param"] == "prompt"
    for mixed in ([5, "x"], [5, [6]], ["x", 5]):  # one list holds one kind of prompt
        assert (
            error_of(http.post("/v1/completions", json={**base, "prompt": mixed}), 400)["param"] == "prompt"
        )
    assert error_of(http.post("/v1/completions", json=base), 400)["param"] == "prompt"
    unstreamed = {**base, "prompt": "x", "stream_options": {"include_usage": True}}
    assert error_of(http.post("/v1/completions", json=unstreamed), 400)["param"] == "stream_options"
    streamed = http.post("/v1/completions", json={**unstreamed, "stream": True, "stream_options": None})
    assert streamed.status_code == 200  # null is no options


def test_context_overflow_is_400_with_the_numbers(http: httpx.Client, server: LiveServer) -> None:
    max_len = server.engine.model_info.max_model_len
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": max_len})
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"
    assert str(max_len) in error["message"] and str(max_len + 3) in error["message"]
    too_long = {"model": "tiny", "prompt": [5] * max_len}
    error = error_of(http.post("/v1/completions", json=too_long), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


def test_max_tokens_omitted_fills_the_context(http: httpx.Client, server: LiveServer) -> None:
    max_len = server.engine.model_info.max_model_len
    prompt = [5] * (max_len - 3)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert error_of(r, 400)["code"] == "invalid_json"
    r = http.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    error_of(r, 400)


def test_a_body_that_is_not_a_json_object_says_what_to_send(http: httpx.Client) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):  # curl -d; a bare client
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
        error = error_of(r, 400)
        assert error["code"] == "invalid_json", error
        assert "Content-Type: application/json" in error["message"] and content_type in error["message"]
    r = http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert error_of(r, 400)["message"] == "the request body must be a JSON object"


def test_unknown_model_and_route_are_404(http: httpx.Client) -> None:
    error = error_of(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error_of(http.get("/v1/models/gpt-9"), 404)["code"] == "model_not_found"
    assert error_of(http.get("/v1/nothing-here"), 404)["code"] == "not_found"
    assert error_of(http.get("/v1/chat/completions"), 405)


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={**CHAT, "frobnicate": 3, "tools_v9": []})
    assert r.status_code == 200, r.text


def test_body_over_the_limit_is_413(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", max_body_bytes=1000) as live:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        error = error_of(httpx.post(f"{live.url}/v1/chat/completions", json=big), 413)
        assert error["code"] == "body_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            yield b"y" * 2000
            yield b'"}]}'

        r = httpx.post(
            f"{live.url}/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        error_of(r, 413)


def test_api_keys_give_401(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", api_keys=["k1", "k2"]) as live:
        url = f"{live.url}/v1/chat/completions"
        assert error_of(httpx.post(url, json=CHAT), 401)["code"] == "invalid_api_key"
        assert error_of(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer nope"}), 401)
        assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert error_of(httpx.get(f"{live.url}/v1/models"), 401)
        # probes and scrapers need no key
        assert httpx.get(f"{live.url}/health").status_code == 200
        assert httpx.get(f"{live.url}/metrics").status_code == 200
        assert httpx.get(f"{live.url}/openapi.json").status_code == 200


def test_the_key_can_protect_metrics_and_docs_too(tiny_engine: AsyncEngine) -> None:
    settings = {"served_model_name": "tiny", "api_keys": ["k1"], "key_protects_all": True}
    with run_live_server(tiny_engine, **settings) as live:
        key = {"Authorization": "Bearer k1"}
        for path in ("/metrics", "/version", "/docs", "/openapi.json"):
            assert error_of(httpx.get(f"{live.url}{path}"), 401)["code"] == "invalid_api_key", path
            assert httpx.get(f"{live.url}{path}", headers=key).status_code == 200, path
        assert "/v1/chat/completions" in httpx.get(f"{live.url}/openapi.json", headers=key).json()["paths"]
        for probe in ("/health", "/ready"):  # probes never need the key
            assert httpx.get(f"{live.url}{probe}").status_code == 200


def test_engine_failure_is_500_with_request_id_and_no_trace(tiny_engine: AsyncEngine) -> None:
    with run_live_server(FailingEngine(tiny_engine), served_model_name="tiny") as live:
        r = httpx.post(f"{live.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-42"})
        error = error_of(r, 500)
        assert error["type"] == "server_error"
        assert "req-42" in error["message"]
        assert "secret" not in r.text and "Traceback" not in r.text
        # one request's failure never touches another: the server keeps serving
        assert httpx.get(f"{live.url}/health").status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_engine: AsyncEngine) -> None:
    gated = GatedEngine(tiny_engine)
    with run_live_server(
        gated, served_model_name="tiny", max_waiting_sequences=2, retry_after_seconds=3
    ) as live:
        url = f"{live.url}/v1/chat/completions"
        results: list[httpx.Response] = []
        waiting = [
            threading.Thread(target=lambda: results.append(httpx.post(url, json=CHAT, timeout=60)))
            for _ in range(2)
        ]
        for t in waiting:
            t.start()
        assert wait_for(lambda: gated.arrived == 2)
        r = httpx.post(url, json=CHAT)
        error = error_of(r, 429)
        assert r.headers["retry-after"] == "3"
        assert error["type"] == "rate_limit_error"
        gated.open()
        for t in waiting:
            t.join(timeout=60)
        assert [x.status_code for x in results] == [200, 200]
        # the waiting slots are free again
        assert httpx.post(url, json=CHAT).status_code == 200


def test_token_queue_limit_is_429(tiny_engine: AsyncEngine) -> None:
    gated = GatedEngine(tiny_engine)
    with run_live_server(gated, served_model_name="tiny", max_waiting_tokens=40) as live:
        url = f"{live.url}/v1/completions"
        first = threading.Thread(
            target=lambda: httpx.post(url, json={"prompt": [5] * 30, "max_tokens": 1}, timeout=60)
        )
        first.start()
        assert wait_for(lambda: gated.arrived == 1)
        r = httpx.post(url, json={"prompt": [5] * 20, "max_tokens": 1})
        assert "tokens waiting" in error_of(r, 429)["message"]
        assert "retry-after" in r.headers
        # A short prompt with a large output budget weighs its budget: 31 + 2 + 20 > 40.
        r = httpx.post(url, json={"prompt": [5] * 2, "max_tokens": 20})
        assert "tokens waiting" in error_of(r, 429)["message"]
        gated.open()
        first.join(timeout=60)


def test_draining_server_answers_503(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny") as live:
        assert httpx.get(f"{live.url}/ready").status_code == 200
        live.state.admission.draining = True
        assert httpx.get(f"{live.url}/ready").json() == {"status": "draining"}
        assert httpx.get(f"{live.url}/ready").status_code == 503
        error = error_of(httpx.post(f"{live.url}/v1/chat/completions", json=CHAT), 503)
        assert error["code"] == "draining"
        assert httpx.get(f"{live.url}/health").status_code == 200


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_a_message_without_content_is_400_naming_it(http: httpx.Client, role: str) -> None:
    for message in ({"role": role, "content": None}, {"role": role}):  # null, or left out
        messages = [{"role": "user", "content": "hi"}, message]
        error = error_of(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400)
        assert error["param"] == "messages.1.content", message
        assert f"a {role} message needs content" in error["message"]


def test_an_assistant_message_with_tool_calls_may_have_null_content(http: httpx.Client) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert r.status_code == 200, r.text
