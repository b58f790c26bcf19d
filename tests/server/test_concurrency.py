"""64 concurrent streams through the official async client all complete with correct usage."""

from __future__ import annotations

import asyncio

import openai
from server_harness import LiveServer, wait_for
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

STREAMS = 64
MAX_TOKENS = 6


async def one_stream(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str | None, int]:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": f"Request number {i}"}],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish, usage, prompt_tokens = "", None, 0, 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    return text, usage, finish, prompt_tokens


async def run_all(url: str) -> list[tuple[str, int, str | None, int]]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        return await asyncio.gather(*(one_stream(client, i) for i in range(STREAMS)))


def test_64_concurrent_streams_complete_with_correct_usage(server: LiveServer) -> None:
    results = asyncio.run(run_all(server.url))
    assert len(results) == STREAMS
    tokenizer = server.engine.tokenizer
    for i, (_text, completion_tokens, finish, prompt_tokens) in enumerate(results):
        assert finish == "length"
        assert completion_tokens == MAX_TOKENS
        messages = [{"role": "user", "content": f"Request number {i}"}]
        assert prompt_tokens == len(tokenizer.apply_chat_template(messages))
    assert wait_for(lambda: server.engine.stats().kv_blocks_used == 0)


def test_the_server_runs_on_uvloop_and_httptools(server: LiveServer) -> None:
    # Kiln depends on both and uvicorn picks them up by itself; on asyncio's loop and h11 the front end
    # costs about twice the CPU per streamed token (docs/results/2026-11-25-h100/README.md, run AA1).
    assert type(server.server.servers[0]).__module__.startswith("uvloop")
    assert issubclass(server.server.config.http_protocol_class, HttpToolsProtocol)  # with Kiln's limits
