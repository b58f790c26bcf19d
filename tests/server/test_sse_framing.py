"""Raw SSE bytes: OpenAI's framing, keep-alive comments while queued, errors after the stream began."""

from __future__ import annotations

import json
import threading

import httpx
from fakes import FailingEngine, GatedEngine, TextEngine
from server_harness import LiveServer, run_live_server, wait_for

from kiln.clients.thread import AsyncEngine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True}


def events(body: str) -> list[str]:
    """The stream split into events (blank-line separated), as OpenAI frames it."""
    assert body.endswith("\n\n"), body[-50:]
    return body[:-2].split("\n\n")


def data_of(event_list: list[str]) -> list[str]:
    return [e.removeprefix("data: ") for e in event_list if e.startswith("data: ")]


def test_chat_stream_framing(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"]
    # Neither a cache nor a buffering proxy (nginx) may hold a stream back.
    assert (r.headers["cache-control"], r.headers["x-accel-buffering"]) == ("no-store", "no")
    frames = events(r.text)
    assert all(f.startswith("data: ") for f in frames), frames
    payloads = data_of(frames)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    first, last = chunks[0]["choices"][0], chunks[-1]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert last["delta"] == {}
    assert last["finish_reason"] == "length"
    for middle in chunks[1:-1]:
        assert middle["choices"][0]["finish_reason"] is None
        assert middle["choices"][0]["delta"]["content"]


def test_completion_stream_framing_with_usage(server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    payloads = data_of(events(r.text))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_keepalive_comments_while_queued(tiny_engine: AsyncEngine) -> None:
    gated = GatedEngine(tiny_engine)
    with run_live_server(gated, served_model_name="tiny", keepalive_interval_seconds=0.05) as live:
        seen: list[str] = []
        with httpx.stream(
            "POST", f"{live.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30
        ) as r:
            lines = r.iter_lines()
            for line in lines:
                seen.append(line)
                if sum(1 for s in seen if s.startswith(":")) >= 3:
                    break
            assert gated.arrived == 1  # still held before the engine: no token yet
            gated.open()
            seen.extend(lines)
        comments = [s for s in seen if s.startswith(":")]
        assert comments[0] == ": keep-alive"
        assert seen[-2:] == ["data: [DONE]", ""] or seen[-1] == "data: [DONE]"


def test_engine_failure_mid_stream_is_an_error_event_then_done(tiny_engine: AsyncEngine) -> None:
    with run_live_server(FailingEngine(tiny_engine, fail_after=1), served_model_name="tiny") as live:
        r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
        assert r.status_code == 200  # the stream had started
        payloads = data_of(events(r.text))
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["type"] == "server_error" and "request id" in error["message"]
        assert "secret" not in r.text


def test_concurrent_failure_does_not_touch_other_streams(tiny_engine: AsyncEngine) -> None:
    with (
        run_live_server(tiny_engine, served_model_name="tiny") as good,
        run_live_server(FailingEngine(tiny_engine), served_model_name="tiny") as bad,
    ):
        results: dict[str, int] = {}
        threads = [
            threading.Thread(
                target=lambda: results.update(
                    bad=httpx.post(f"{bad.url}/v1/chat/completions", json=CHAT).status_code
                )
            ),
            threading.Thread(
                target=lambda: results.update(
                    good=httpx.post(f"{good.url}/v1/chat/completions", json=CHAT).status_code
                )
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == {"bad": 500, "good": 200}
        assert wait_for(lambda: tiny_engine.stats().kv_blocks_used == 0)


def test_unicode_line_separators_never_split_a_chunk(tiny_engine: AsyncEngine) -> None:
    # JSON may carry U+2028 raw, but httpx's iter_lines (str.splitlines) ends a line there.
    text = "a\u2028b\x85c\u2029d\x1ce\n"
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True, "stream": True}
    with (
        run_live_server(TextEngine(tiny_engine, text), served_model_name="tiny") as live,
        httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as r,
    ):
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text * 3


def test_on_close_runs_on_the_event_loop_thread() -> None:
    """`on_close` (the request's end: ticket, aborts, log) runs on the loop that streamed, not in
    Starlette's thread pool: no thread hop per request, no second thread changing the admission counts."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from kiln.serve.settings import ServerSettings
    from kiln.serve.sse import sse_response

    threads: dict[str, int] = {}

    async def chunks():
        threads["stream"] = threading.get_ident()
        yield '{"n": 1}'

    app = FastAPI()

    @app.get("/stream")
    async def stream():
        async def on_close() -> None:
            threads["on_close"] = threading.get_ident()

        return sse_response(chunks(), settings=ServerSettings(), request_id="r1", on_close=on_close)

    with TestClient(app) as client:
        body = client.get("/stream").text
    assert data_of(events(body)) == ['{"n": 1}', "[DONE]"]
    assert threads["on_close"] == threads["stream"]
