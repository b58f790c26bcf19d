"""One client cannot hurt another: requests that once failed a whole batch, or cost without bound, are
refused at the door with a 400 naming the field, while the streams beside them finish normally."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from server_harness import run_live_server, wait_for

from kiln.clients.thread import AsyncEngine
from kiln.serve import tokenize

CHAT = {"model": "tiny", "max_tokens": 2}
POISON = [
    # (endpoint, body, param): each once reached the engine and ended every request in its batch, or
    # made the engine or the event loop do work out of all proportion.
    ("completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**64}, "seed"),
    ("completions", {"prompt": "hi", "max_tokens": 4, "seed": -(2**63) - 1}, "seed"),
    ("completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**64 - 1, "n": 2}, "seed"),
    ("completions", {"prompt": "hi", "max_tokens": 4, "stop": ["x" * 30_000]}, "stop"),
    ("completions", {"prompt": "hi", "max_tokens": 4, "stop": ["s"] * 65}, "stop"),
    (
        "completions",
        {"prompt": "hi", "max_tokens": 4, "logit_bias": {str(t): 1 for t in range(1025)}},
        "logit_bias",
    ),
    ("completions", {"prompt": "hi", "max_tokens": 4, "priority": -(10**30)}, "priority"),
    ("completions", {"prompt": "a\ud800b", "max_tokens": 4}, "prompt"),
    ("completions", {"prompt": "x" * 5_000, "max_tokens": 4}, "prompt"),  # over max_prompt_chars
    ("completions", {"prompt": ["hi there"] * 500, "max_tokens": 4, "n": 8}, "n"),  # 4,000 sequences
    ("completions", {"prompt": "hi", "max_tokens": 100}, "max_tokens"),  # over max_tokens_limit
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "y" * 5_000}]}, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
]


def _stream(url: str, results: list[tuple[str | None, int]]) -> None:
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "stream": True}
    tokens, finish = 0, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                tokens += 1 if choice["text"] else 0
                finish = choice["finish_reason"] or finish
    results.append((finish, r.status_code))


def test_poisoned_requests_are_refused_and_their_neighbours_finish(tiny_engine: AsyncEngine) -> None:
    settings = {"served_model_name": "tiny", "max_prompt_chars": 4_000, "max_tokens_limit": 64}
    with run_live_server(tiny_engine, **settings) as live:
        results: list[tuple[str | None, int]] = []
        neighbours = [threading.Thread(target=_stream, args=(live.url, results)) for _ in range(8)]
        for t in neighbours:
            t.start()
        for endpoint, body, param in POISON:
            # json.dumps writes a lone surrogate as the escape "\ud800", as a client's JSON would.
            r = httpx.post(
                f"{live.url}/v1/{endpoint}",
                content=json.dumps({"model": "tiny", **body}),
                headers={"content-type": "application/json"},
                timeout=60,
            )
            assert r.status_code == 400, (body, r.text[:300])
            assert r.json()["error"]["param"] == param, (body, r.text[:300])
        for t in neighbours:
            t.join(timeout=60)
        assert results == [("length", 200)] * 8
        assert wait_for(lambda: tiny_engine.stats().kv_blocks_used == 0)


def test_a_large_prompt_is_tokenized_off_the_event_loop() -> None:
    """More than INLINE_CHARS characters go to a worker thread, so the streams on this loop keep flowing."""
    threads: list[int] = []

    def encode() -> list[int]:
        threads.append(threading.get_ident())
        return [1]

    async def main() -> int:
        await tokenize.tokenize(encode, chars=10)
        await tokenize.tokenize(encode, chars=tokenize.INLINE_CHARS + 1)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads[0] == loop_thread and threads[1] != loop_thread


@pytest.mark.parametrize(
    ("settings", "body", "max_tokens"),
    [
        ({"default_max_tokens": 5}, {}, 5),
        ({"default_max_tokens": 5}, {"max_tokens": 7}, 7),
        ({}, {}, None),  # none set: all the room the context has left
    ],
)
def test_server_default_max_tokens(tiny_engine: AsyncEngine, settings: dict, body: dict, max_tokens) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", **settings) as live:
        request = {"model": "tiny", "prompt": [5, 6], "ignore_eos": True, **body}
        usage = httpx.post(f"{live.url}/v1/completions", json=request, timeout=60).json()["usage"]
        room = tiny_engine.model_info.max_model_len - 2
        assert usage["completion_tokens"] == (room if max_tokens is None else max_tokens)
