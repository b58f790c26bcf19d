"""Scoring prompts over HTTP: completions' `echo` with `logprobs`, and vLLM's `prompt_logprobs` extension.

The values themselves are checked against transformers in tests/model/test_prompt_logprobs.py; here, that
the server puts the engine's scores where each API says, the same way streamed or not, and refuses what
it cannot do.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_harness import LiveServer

PROMPT = [5, 17, 42, 99, 7, 64, 23]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(client: openai.OpenAI) -> None:
    # What lm-evaluation-harness's local-completions model sends to score a continuation.
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(PROMPT) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    # Offsets count the characters of the tokens before each one, the echoed prompt's included.
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    # The completion's part is what the same request without echo returns.
    plain = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    ).choices[0]
    assert lp.tokens[len(PROMPT) :] == plain.logprobs.tokens
    assert lp.token_logprobs[len(PROMPT) :] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert r.choices[0].text.endswith(plain.text)


def test_echo_scores_equal_prompt_logprobs_and_the_next_token_scores(http: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    echoed = http.post("/v1/completions", json={**body, "echo": True, "logprobs": 1}).json()
    extension = http.post("/v1/completions", json={**body, "prompt_logprobs": 1}).json()
    choice = extension["choices"][0]
    assert choice["logprobs"] is None  # not asked for
    scores = choice["prompt_logprobs"]
    assert len(scores) == len(PROMPT) and scores[0] is None
    for position in range(1, len(PROMPT)):
        entry = scores[position]
        mine = entry[str(PROMPT[position])]
        assert set(mine) == {"logprob", "rank", "decoded_token"} and mine["rank"] >= 1
        assert [e["rank"] for e in entry.values()].count(1) == 1 and len(entry) <= 2
        assert mine["logprob"] == pytest.approx(
            echoed["choices"][0]["logprobs"]["token_logprobs"][position], abs=1e-5
        )
    # Scoring a prompt never changes what is generated after it.
    plain = http.post("/v1/completions", json=body).json()
    assert choice["text"] == plain["choices"][0]["text"]
    assert echoed["choices"][0]["text"].endswith(choice["text"])


def test_streamed_echo_with_logprobs_matches_the_whole_answer(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "prompt": [PROMPT, PROMPT[:3]],
        "n": 2,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "echo": True,
        "logprobs": 1,
    }
    whole = http.post("/v1/completions", json=body).json()
    streamed: dict[int, dict] = {}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                into = streamed.setdefault(choice["index"], {"text": "", "tokens": [], "token_logprobs": []})
                into["text"] += choice["text"]
                if choice["logprobs"]:
                    into["tokens"] += choice["logprobs"]["tokens"]
                    into["token_logprobs"] += choice["logprobs"]["token_logprobs"]
    assert sorted(streamed) == [0, 1, 2, 3]
    for choice in whole["choices"]:
        got = streamed[choice["index"]]
        assert got["text"] == choice["text"]
        assert got["tokens"] == choice["logprobs"]["tokens"]
        assert got["token_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=1e-5)
        assert len(got["tokens"]) == (len(PROMPT) if choice["index"] < 2 else 3) + 4


def test_chat_prompt_logprobs_cover_the_templated_prompt(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "prompt_logprobs": 0,
    }
    r = http.post("/v1/chat/completions", json=body).json()
    scores = r["prompt_logprobs"]
    assert len(scores) == r["usage"]["prompt_tokens"] and scores[0] is None
    assert all(len(entry) == 1 for entry in scores[1:])  # the prompt's token alone
    plain = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "prompt_logprobs"})
    assert "prompt_logprobs" not in plain.json()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_refusals_name_the_field(http: httpx.Client, path: str) -> None:
    body = {"model": "tiny", "max_tokens": 2}
    body |= {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    for bad in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
        r = http.post(path, json={**body, **bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt_logprobs"


def test_tokens_named_by_id(http: httpx.Client) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
    }
    r = http.post("/v1/completions", json={**body, "prompt": PROMPT, "echo": True, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"][: len(PROMPT)] == [f"token_id:{i}" for i in PROMPT]
    assert all(t.startswith("token_id:") for top in lp["top_logprobs"][1:] for t in top)
    plain = http.post(
        "/v1/completions", json={**body, "prompt": PROMPT, "logprobs": 2, "return_tokens_as_token_ids": False}
    )
    assert lp["text_offset"][len(PROMPT) :] == [
        o + lp["text_offset"][len(PROMPT)] for o in plain.json()["choices"][0]["logprobs"]["text_offset"]
    ]
    chat = http.post(
        "/v1/chat/completions",
        json={**body, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1},
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(e["token"].startswith("token_id:") for e in content)
