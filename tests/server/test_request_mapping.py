"""Request fields reach the engine as the issue lists them; engine refusals come back as 400."""

from __future__ import annotations

import httpx
from fakes import RecordingEngine, RefusingEngine
from server_harness import LiveServer, run_live_server

from kiln.clients.thread import AsyncEngine


def test_every_sampling_field_reaches_the_engine(tiny_engine: AsyncEngine) -> None:
    recorder = RecordingEngine(tiny_engine)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 5,
        "max_tokens": 99,  # max_completion_tokens wins
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "n": 2,
        "seed": 11,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [2],
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.1,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"5": -1.5},
        "ignore_eos": True,
        "min_tokens": 1,
        "skip_special_tokens": False,
        "allowed_token_ids": [5, 6],
        "include_stop_str_in_output": True,
        "user": "u-1",
        "priority": -3,
    }
    with run_live_server(recorder, served_model_name="tiny") as live:
        r = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "same"})
        assert r.status_code == 200, r.text
        again = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "same"})
        assert again.status_code == 200, again.text
    call = recorder.calls[0]
    p = call["params"]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.n, p.seed) == (
        5,
        0.7,
        0.9,
        40,
        0.05,
        2,
        11,
    )
    assert p.stop == ["\n\n", "END"] and p.stop_token_ids == [2]
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.1, 0.2, 1.1)
    assert p.logprobs == 3 and p.logit_bias == {5: -1.5} and p.ignore_eos and p.min_tokens == 1
    assert not p.skip_special_tokens and p.include_stop_str_in_output and p.allowed_token_ids == [5, 6]
    assert call["priority"] == -3
    assert call["request_id"] == r.json()["id"]
    assert call["owner"] == r.json()["id"]  # the request's prompts share one fair share of the engine
    # the same X-Request-Id twice never collides in the engine
    assert recorder.calls[1]["request_id"] != call["request_id"]


def test_same_seed_same_sample(server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    texts = [
        httpx.post(f"{server.url}/v1/completions", json={**body, "seed": seed}).json()["choices"][0]["text"]
        for seed in (1, 1, 2)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_engine_refusal_is_400(server: LiveServer) -> None:
    # An empty prompt tokenizes to no tokens: the engine refuses it before its first output.
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "", "stream": stream})
        if stream:
            assert '"type":"invalid_request_error"' in r.text and "empty" in r.text
        else:
            assert r.status_code == 400, r.text
            assert "empty" in r.json()["error"]["message"]


def test_backend_refusal_names_the_field(tiny_engine: AsyncEngine) -> None:
    refusing = RefusingEngine(tiny_engine, "logprobs are not available from this engine", "logprobs")
    with run_live_server(refusing, served_model_name="tiny") as live:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "logprobs": 1}
        r = httpx.post(f"{live.url}/v1/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "logprobs"
        refusing.message, refusing.field = "this request cannot run", None
        r = httpx.post(f"{live.url}/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] is None
        # A chat request carries the prompt as `messages` and logprobs as `top_logprobs`.
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for field, param in (("prompt", "messages"), ("logprobs", "top_logprobs"), ("suffix", None)):
            refusing.field = field
            r = httpx.post(f"{live.url}/v1/chat/completions", json=chat)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (field, r.text)
