"""A client that goes away has its engine request aborted and its KV blocks returned."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from server_harness import LiveServer, open_tiny_engine, run_live_server, wait_for

if TYPE_CHECKING:
    from kiln.serve.generation import Generation

LONG = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Tell me a long story"}],
    "max_tokens": 900,
    "ignore_eos": True,
}


def cancelled_count(url: str) -> float:
    """Cancelled requests over every endpoint."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("kiln_requests_total") and 'outcome="cancelled"' in line
    )


def read_content_chunks(lines: object, count: int) -> None:
    seen = 0
    for line in lines:  # type: ignore[attr-defined]
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            seen += bool(delta.get("content"))
            if seen >= count:
                return
    raise AssertionError("stream ended early")


def test_disconnect_mid_stream_frees_blocks(server: LiveServer) -> None:
    engine = server.engine
    before = cancelled_count(server.url)
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30
    ) as r:
        lines = r.iter_lines()  # referenced: httpx closes a response when its iterator is collected
        read_content_chunks(lines, 3)
        assert engine.stats().kv_blocks_used > 0
    # closed mid-stream: aborted within a step, blocks back, nothing left running
    assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)
    assert wait_for(lambda: cancelled_count(server.url) == before + 1)
    # The engine's own cleanup ran to the end (the SSE response's cancel scope must not cut it short):
    # no per-request output sink is left behind.
    assert wait_for(lambda: not engine._sinks)  # type: ignore[attr-defined]


def test_disconnect_of_non_stream_request_frees_blocks(server: LiveServer) -> None:
    engine = server.engine
    before = cancelled_count(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)
    assert wait_for(lambda: cancelled_count(server.url) == before + 1)


def test_disconnect_before_first_token_removes_the_queued_request(tiny_gqa_dir: Path) -> None:
    # One running slot: a blocker holds it, so the second request is still queued, tokenless.
    engine = open_tiny_engine(tiny_gqa_dir, max_num_seqs=1)
    try:
        with run_live_server(engine, served_model_name="tiny") as live:
            url = f"{live.url}/v1/chat/completions"
            # Keep the line iterators referenced: httpx closes a response when its iterator is collected.
            with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as blocker:
                blocker_lines = blocker.iter_lines()
                read_content_chunks(blocker_lines, 1)
                with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as queued:
                    queued_lines = queued.iter_lines()
                    first = next(line for line in queued_lines if line.startswith("data: "))
                    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
                    assert wait_for(lambda: engine.stats().num_waiting == 1)
                # gone before its first token: out of the queue while the blocker still runs
                assert wait_for(lambda: engine.stats().num_waiting == 0)
                assert engine.stats().num_running == 1
            assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)
            assert wait_for(lambda: cancelled_count(live.url) == 2)
    finally:
        asyncio.run(engine.shutdown())


def long_generation(server: LiveServer, request_id: str, prompts: list[list[int]]) -> Generation:
    """A streamed completions `Generation` of 900 tokens a prompt, admitted, not started."""
    from kiln.engine.sampling_params import SamplingParams
    from kiln.serve.generation import Generation, Prompt

    return Generation(
        server.state,
        request_id=request_id,
        http_request_id=f"h-{request_id}",
        endpoint="completions",
        prompts=[Prompt(ids) for ids in prompts],
        params=SamplingParams(max_tokens=900, ignore_eos=True),
        priority=0,
        ticket=server.state.admission.admit(len(prompts), sum(len(ids) + 900 for ids in prompts)),
        stream=True,
    )


def test_a_generation_reaches_the_engine_at_start_and_aclose_ends_one_never_read(server: LiveServer) -> None:
    """The handler's `start()` hands the request to the engine there and then (the native driver's loop
    runs), without the response reading anything; `aclose()` (the response's on_close) ends a request
    whose stream never began (a client gone first): aborted, blocks back, ticket released, counted once
    as cancelled."""
    state, engine = server.state, server.engine
    before = cancelled_count(server.url)

    async def scenario() -> None:
        generation = long_generation(server, "gen-never-read", [[5, 6, 7]])
        generation.start()
        assert "gen-never-read" in engine._sinks  # type: ignore[attr-defined]  # no loop iteration needed
        await asyncio.sleep(0.2)
        assert engine.stats().num_running == 1
        await generation.aclose()
        await generation.aclose()  # idempotent
        assert "gen-never-read" not in engine._sinks  # type: ignore[attr-defined]
        assert state.admission.waiting_requests == 0

    asyncio.run(scenario())
    assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)
    assert cancelled_count(server.url) == before + 1


def test_a_generation_ended_before_its_pumps_ran_aborts_what_start_submitted(server: LiveServer) -> None:
    """`start()` submitted both prompts; the request ends in the same loop iteration, so its pumps never
    run (a cancelled task that never started runs none of its code): closing it still aborts both."""
    state, engine = server.state, server.engine

    async def scenario() -> None:
        generation = long_generation(server, "gen-unpumped", [[5, 6, 7], [8, 9]])
        generation.start()
        assert {"gen-unpumped-0", "gen-unpumped-1"} <= set(engine._sinks)  # type: ignore[attr-defined]
        await generation.aclose()
        assert not {"gen-unpumped-0", "gen-unpumped-1"} & set(engine._sinks)  # type: ignore[attr-defined]
        assert state.admission.waiting_requests == 0

    asyncio.run(scenario())
    assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)


def test_a_non_streaming_handler_cancelled_before_it_reads_aborts_its_request(server: LiveServer) -> None:
    """The handler submits the request itself, so if it is cancelled before `_collect` ever ran (server
    shutdown, a disconnect in the same loop iteration), its `finally` must still end the request."""
    from starlette.requests import Request

    from kiln.serve.completions import create_completion
    from kiln.serve.protocol import CompletionRequest

    engine = server.engine
    scope = {
        "type": "http",
        "app": server.server.config.app,
        "method": "POST",
        "path": "/v1/completions",
        "headers": [],
        "state": {"request_id": "h-cancelled"},
    }

    async def never() -> dict:
        await asyncio.Event().wait()
        return {}

    async def scenario() -> None:
        body = CompletionRequest(model="tiny", prompt=[5, 6, 7], max_tokens=900, ignore_eos=True)
        handler = asyncio.ensure_future(create_completion(body, Request(scope, never)))
        await asyncio.sleep(0)  # the handler has submitted and waits on _collect, which has not run yet
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        assert not [rid for rid in engine._sinks if rid.startswith("cmpl-")]  # type: ignore[attr-defined]
        assert server.state.admission.waiting_requests == 0

    asyncio.run(scenario())
    assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)
