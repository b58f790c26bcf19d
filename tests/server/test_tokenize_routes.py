"""POST /tokenize and /detokenize in vLLM's shapes: the same ids the generation routes use, text back,
400s naming the field, the API key, and /openapi.json documenting both. Also vLLM's chat-template options,
which chat completions and /tokenize share: a prefilled answer continued (and echoed), the generation
prompt left out,
template variables passed, the rendering's own arguments refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_harness import LiveServer, run_live_server

from kiln.clients.thread import AsyncEngine

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(http: httpx.Client, path: str, body: dict[str, Any]) -> int:
    return ok(http.post(path, json={**body, "max_tokens": 1}))["usage"]["prompt_tokens"]


def test_tokenize_a_prompt_as_completions_does(http: httpx.Client, server: LiveServer) -> None:
    tokenizer = server.engine.tokenizer
    text = "The quick brown fox, héllo 🦊"
    body = ok(http.post("/tokenize", json={"model": "tiny", "prompt": text}))
    assert set(body) == {"count", "max_model_len", "tokens"}  # token_strs only when asked
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == server.engine.model_info.max_model_len
    assert body["count"] == prompt_tokens(http, "/v1/completions", {"prompt": text})
    plain = ok(http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}))
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    strs = ok(http.post("/tokenize", json={"prompt": text, "return_token_strs": True}))
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])


def test_tokenize_a_conversation_as_chat_does(http: httpx.Client, server: LiveServer) -> None:
    body = ok(http.post("/tokenize", json={"messages": MESSAGES}))
    assert body["count"] == prompt_tokens(http, "/v1/chat/completions", {"messages": MESSAGES})
    assert body["tokens"] == server.engine.tokenizer.apply_chat_template(MESSAGES)
    bare = ok(http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}))
    assert bare["tokens"] == server.engine.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=False
    )
    assert bare["count"] < body["count"]
    # tools are rendered as the chat route renders them (here: Kiln's fallback system message)
    with_tools = ok(http.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS}))
    chat = {"messages": MESSAGES, "tools": TOOLS}
    assert with_tools["count"] == prompt_tokens(http, "/v1/chat/completions", chat) > body["count"]


def test_detokenize_gives_the_text_back(http: httpx.Client, server: LiveServer) -> None:
    text = "Once upon a time, ünïcödé 日本"
    ids = ok(http.post("/tokenize", json={"prompt": text}))["tokens"]
    assert ok(http.post("/detokenize", json={"model": "tiny", "tokens": ids})) == {"prompt": text}
    chat_ids = ok(http.post("/tokenize", json={"messages": MESSAGES}))["tokens"]
    rendered = server.engine.tokenizer.render_chat_template(MESSAGES)
    assert ok(http.post("/detokenize", json={"tokens": chat_ids}))["prompt"] == rendered  # specials kept
    assert ok(http.post("/detokenize", json={"tokens": []})) == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
        ("/detokenize", {}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
        ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, 400, "add_special_tokens"),
        ("/tokenize", '{"prompt": "\\ud800"}', 400, "prompt"),  # a lone surrogate, as JSON spells it
    ],
)
def test_bad_requests_name_the_field(
    http: httpx.Client, path: str, body: dict[str, Any] | str, status: int, param: str
) -> None:
    if isinstance(body, str):  # raw JSON text
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_prompt_length_is_bounded_as_for_generation(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", max_prompt_chars=10) as live:
        r = httpx.post(f"{live.url}/tokenize", json={"prompt": "x" * 11})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        r = httpx.post(f"{live.url}/tokenize", json={"messages": [{"role": "user", "content": "y" * 11}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_behind_the_api_key_and_documented(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", api_keys=["sekrit"]) as live:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            assert httpx.post(live.url + path, json=body).status_code == 401, path
            r = httpx.post(live.url + path, json=body, headers={"Authorization": "Bearer sekrit"})
            assert r.status_code == 200, r.text
        doc = httpx.get(f"{live.url}/openapi.json").json()
    for path, response in (("/tokenize", "TokenizeResponse"), ("/detokenize", "DetokenizeResponse")):
        op = doc["paths"][path]["post"]
        assert {"200", "400", "401", "404", "413", "500", "503"} <= set(op["responses"]), path
        assert "422" not in op["responses"] and op["security"] == [{"apiKey": []}]
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{response}"}


# --- chat template options -------------------------------------------------------------------------
PREFILLED = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "My favourite is"},
]
GREEDY = {"model": "tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def test_continue_final_message_generates_after_the_prefill(http: httpx.Client, server: LiveServer) -> None:
    tokenizer = server.engine.tokenizer
    ids = tokenizer.apply_chat_template(PREFILLED, False, continue_final_message=True)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("My favourite is")
    chat = ok(
        http.post(
            "/v1/chat/completions", json={**GREEDY, "messages": PREFILLED, "continue_final_message": True}
        )
    )
    assert chat["usage"]["prompt_tokens"] == len(ids)
    # The reply is what the model writes after exactly those ids.
    completion = ok(http.post("/v1/completions", json={**GREEDY, "prompt": ids}))
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    counted = ok(http.post("/tokenize", json={"messages": PREFILLED, "continue_final_message": True}))
    assert counted["tokens"] == ids


def test_add_generation_prompt_false_ends_at_the_last_message(http: httpx.Client, server: LiveServer) -> None:
    ids = server.engine.tokenizer.apply_chat_template(PREFILLED[:1], add_generation_prompt=False)
    chat = ok(
        http.post(
            "/v1/chat/completions", json={**GREEDY, "messages": PREFILLED[:1], "add_generation_prompt": False}
        )
    )
    assert chat["usage"]["prompt_tokens"] == len(ids)
    default = ok(http.post("/v1/chat/completions", json={**GREEDY, "messages": PREFILLED[:1]}))
    assert default["usage"]["prompt_tokens"] > len(ids)


def test_template_variables_are_passed_and_the_renderings_arguments_refused(http: httpx.Client) -> None:
    body = {**GREEDY, "messages": PREFILLED[:1]}
    plain = ok(http.post("/v1/chat/completions", json=body))
    # The tiny model's template reads no variables: one it does not read changes nothing.
    extra = ok(
        http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"enable_thinking": False}})
    )
    assert extra["choices"][0]["message"] == plain["choices"][0]["message"]
    for path, form in (("/v1/chat/completions", body), ("/tokenize", {"messages": PREFILLED[:1]})):
        r = http.post(path, json={**form, "chat_template_kwargs": {"tokenize": False}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
        assert "tokenize" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_contradictions_are_400s_naming_the_field(http: httpx.Client, path: str) -> None:
    both = {"messages": PREFILLED, "continue_final_message": True, "add_generation_prompt": True}
    r = http.post(path, json={**GREEDY, **both} if path.startswith("/v1") else both)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", r.text
    own = {"messages": PREFILLED[:1], "chat_template": "{{ messages }}"}  # the model's template only
    r = http.post(path, json={**GREEDY, **own} if path.startswith("/v1") else own)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text


@pytest.mark.parametrize("field", ["add_generation_prompt", "continue_final_message", "chat_template_kwargs"])
def test_template_options_with_a_text_prompt_are_refused(http: httpx.Client, field: str) -> None:
    value = {} if field == "chat_template_kwargs" else True
    r = http.post("/tokenize", json={"prompt": "hello", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_echo_starts_the_reply_with_the_prefill_it_continues(http: httpx.Client, stream: bool) -> None:
    body = {**GREEDY, "messages": PREFILLED, "continue_final_message": True}
    plain = ok(http.post("/v1/chat/completions", json=body))["choices"][0]["message"]["content"]
    if not stream:
        echoed = ok(http.post("/v1/chat/completions", json={**body, "echo": True}))["choices"][0]["message"][
            "content"
        ]
    else:
        with http.stream("POST", "/v1/chat/completions", json={**body, "echo": True, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        echoed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert echoed == "My favourite is" + plain
    # A last message that is not the assistant's is not echoed.
    user_last = {**GREEDY, "messages": PREFILLED[:1]}
    assert (
        ok(http.post("/v1/chat/completions", json={**user_last, "echo": True}))["choices"][0]["message"]
        == ok(http.post("/v1/chat/completions", json=user_last))["choices"][0]["message"]
    )
