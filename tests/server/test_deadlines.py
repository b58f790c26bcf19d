"""Per-request deadlines: the `timeout` field, the X-Request-Timeout header, the server's default and cap.

At the deadline the request is aborted in the engine (queued or running, blocks back), the client gets a
504 `request_timeout` (a stream: an error event, then [DONE]), and `kiln_requests_total` counts it as
outcome `timeout`. A request that ends before its deadline is untouched.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakes import RecordingEngine, _Wrapper
from server_harness import LiveServer, open_tiny_engine, run_live_server, start_cli_server, wait_for

from kiln.clients.thread import AsyncEngine
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.serve.errors import RequestTimeoutError
from kiln.serve.generation import Deadline, Generation, Prompt, request_deadline
from kiln.serve.settings import ServerSettings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# The longest requests the tiny model can run (its whole 1,024-token context). Over `slow_engine` each
# step takes 2 ms more, so they run for over 2 s on any machine and a deadline of a few tenths of a
# second always falls while they run.
LONG_CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Tell me a long story"}],
    "max_tokens": 1000,
    "ignore_eos": True,
}
LONG_COMPLETION = {"model": "tiny", "prompt": [5, 6], "max_tokens": 1022, "ignore_eos": True}
SHORT_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def slow_steps(engine: AsyncEngine, seconds: float) -> None:
    """Make each of `engine`'s steps take `seconds` longer (its LLMEngine's `step`, on the step thread)."""
    llm = engine._loop.engine  # type: ignore[attr-defined]
    step = llm.step

    def slow_step() -> Any:
        time.sleep(seconds)
        return step()

    llm.step = slow_step


@pytest.fixture(scope="module")
def slow_engine(tiny_gqa_dir: Path) -> Iterator[AsyncEngine]:
    engine = open_tiny_engine(tiny_gqa_dir)
    slow_steps(engine, 0.002)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def live(slow_engine: AsyncEngine) -> Iterator[LiveServer]:
    with run_live_server(slow_engine, served_model_name="tiny") as server:
        yield server


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def timeouts(url: str, endpoint: str) -> float:
    return metric(url, "kiln_requests_total", endpoint=endpoint, outcome="timeout")


def engine_idle(server: LiveServer) -> bool:
    """Nothing runs or waits and no KV block is held, as the engine and /metrics both say."""
    stats = server.engine.stats()
    idle = stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    return (
        idle
        and metric(server.url, "kiln_kv_cache_usage_ratio") == 0
        and metric(server.url, "kiln_num_requests_running") == 0
        and metric(server.url, "kiln_num_requests_waiting") == 0
    )


def assert_timeout_error(r: httpx.Response, source: str) -> None:
    assert r.status_code == 504, r.text
    assert r.headers["x-should-retry"] == "false"
    error = r.json()["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout" and error["param"] is None
    assert f"(set by {source})" in error["message"], error["message"]


def stream_events(url: str, path: str, body: dict[str, Any], **kw: Any) -> list[str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30, **kw) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


# --- the rule ------------------------------------------------------------------------------------


def test_the_shorter_of_field_and_header_wins_else_the_default_and_the_cap_bounds_all() -> None:
    def pick(body: float | None, header: float | None, **settings: Any) -> tuple[float, str] | None:
        deadline = request_deadline(100.0, body, header, ServerSettings(**settings))
        if deadline is None:
            return None
        assert deadline.at == 100.0 + deadline.seconds
        return deadline.seconds, deadline.source

    assert pick(None, None) is None  # no deadline unless someone sets one
    assert pick(5, None) == (5, "timeout")
    assert pick(None, 5) == (5, "X-Request-Timeout")
    assert pick(5, 2) == (2, "X-Request-Timeout")
    assert pick(2, 5) == (2, "timeout")
    assert pick(None, None, request_timeout_seconds=30) == (30, "request_timeout_seconds")
    assert pick(60, None, request_timeout_seconds=30) == (60, "timeout")  # a default, not a limit
    assert pick(None, None, max_request_timeout_seconds=10) == (10, "max_request_timeout_seconds")
    assert pick(60, 90, max_request_timeout_seconds=10) == (10, "max_request_timeout_seconds")
    assert pick(3, None, max_request_timeout_seconds=10) == (3, "timeout")
    limits = {"request_timeout_seconds": 5, "max_request_timeout_seconds": 10}
    assert pick(None, None, **limits) == (5, "request_timeout_seconds")


def test_the_default_must_fit_under_the_cap() -> None:
    with pytest.raises(ValueError, match="shorter than --request-timeout-seconds"):
        ServerSettings(request_timeout_seconds=20, max_request_timeout_seconds=10)
    for bad in ({"request_timeout_seconds": 0}, {"max_request_timeout_seconds": -1}):
        with pytest.raises(ValueError):
            ServerSettings(**bad)


# --- at the deadline -----------------------------------------------------------------------------


def test_body_timeout_ends_a_running_request_with_504_and_frees_it(live: LiveServer) -> None:
    before = timeouts(live.url, "chat")
    r = httpx.post(live.url + CHAT, json={**LONG_CHAT, "timeout": 0.3}, timeout=30)
    assert_timeout_error(r, "timeout")
    assert timeouts(live.url, "chat") == before + 1
    assert wait_for(lambda: engine_idle(live))
    assert not live.engine._sinks  # type: ignore[attr-defined]
    assert live.state.admission.waiting_requests == 0


def test_header_timeout_ends_a_completion_with_504(live: LiveServer) -> None:
    before = timeouts(live.url, "completions")
    headers = {"X-Request-Timeout": "0.3"}
    r = httpx.post(live.url + COMPLETIONS, json=LONG_COMPLETION, headers=headers, timeout=30)
    assert_timeout_error(r, "X-Request-Timeout")
    assert timeouts(live.url, "completions") == before + 1
    assert wait_for(lambda: engine_idle(live))


def test_header_and_field_together_the_shorter_one_ends_it(live: LiveServer) -> None:
    r = httpx.post(
        live.url + CHAT, json={**LONG_CHAT, "timeout": 60}, headers={"x-request-timeout": "0.3"}, timeout=30
    )
    assert_timeout_error(r, "X-Request-Timeout")
    r = httpx.post(
        live.url + CHAT, json={**LONG_CHAT, "timeout": 0.3}, headers={"X-Request-Timeout": "60"}, timeout=30
    )
    assert_timeout_error(r, "timeout")
    assert wait_for(lambda: engine_idle(live))


def test_a_stream_gets_its_tokens_then_an_error_event_and_done(live: LiveServer) -> None:
    before = timeouts(live.url, "chat")
    events = stream_events(live.url, CHAT, {**LONG_CHAT, "timeout": 0.5})
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
    chunks = [json.loads(e) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)  # what came first was sent
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # it did not finish
    assert timeouts(live.url, "chat") == before + 1
    assert wait_for(lambda: engine_idle(live))


def test_a_completion_stream_with_include_usage_ends_with_the_error(live: LiveServer) -> None:
    body = {**LONG_COMPLETION, "timeout": 0.3, "stream_options": {"include_usage": True}}
    events = stream_events(live.url, COMPLETIONS, body)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert wait_for(lambda: engine_idle(live))


def test_the_openai_client_raises_and_does_not_retry(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=2)
    route = {"route": CHAT, "status": "504"}
    sent = metric(live.url, "kiln_http_requests_total", **route)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="tiny",
            messages=LONG_CHAT["messages"],
            max_tokens=1000,
            extra_body={"ignore_eos": True, "timeout": 0.3},
        )
    assert raised.value.status_code == 504
    assert metric(live.url, "kiln_http_requests_total", **route) == sent + 1  # x-should-retry: false held
    with pytest.raises(openai.APIError, match="deadline"):
        stream = client.chat.completions.create(
            model="tiny",
            messages=LONG_CHAT["messages"],
            max_tokens=1000,
            stream=True,
            extra_headers={"X-Request-Timeout": "0.3"},
            extra_body={"ignore_eos": True},
        )
        for _ in stream:
            pass
    assert wait_for(lambda: engine_idle(live))


def test_requests_that_finish_in_time_are_untouched(live: LiveServer) -> None:
    before = timeouts(live.url, "chat")
    r = httpx.post(
        live.url + CHAT, json={**SHORT_CHAT, "timeout": 60}, headers={"X-Request-Timeout": "30"}, timeout=30
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
    events = stream_events(live.url, CHAT, {**SHORT_CHAT, "timeout": 60})
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    assert any(json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"])
    assert timeouts(live.url, "chat") == before
    assert not live.state.open_generations


def test_bad_values_are_400_naming_the_field_or_header(live: LiveServer) -> None:
    for value in (0, -1, 86_401, "5", True, [1]):
        r = httpx.post(live.url + CHAT, json={**SHORT_CHAT, "timeout": value})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["param"] == "timeout", value
    for literal in ("NaN", "Infinity"):  # JSON extensions Python's parser reads: still not finite
        content = json.dumps(SHORT_CHAT)[:-1] + f', "timeout": {literal}}}'
        r = httpx.post(live.url + CHAT, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "timeout", r.text
    for value in ("0", "-2", "abc", "nan", "inf", "1e9", ""):
        r = httpx.post(live.url + COMPLETIONS, json=LONG_COMPLETION, headers={"X-Request-Timeout": value})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["param"] == "X-Request-Timeout", value
    r = httpx.post(live.url + CHAT, json={**SHORT_CHAT, "timeout": None})  # null: the default, none
    assert r.status_code == 200, r.text


# --- the server's default and cap ------------------------------------------------------------------


def test_the_server_default_applies_and_a_request_may_ask_longer(slow_engine: AsyncEngine) -> None:
    with run_live_server(slow_engine, served_model_name="tiny", request_timeout_seconds=0.3) as server:
        before = timeouts(server.url, "chat")
        r = httpx.post(server.url + CHAT, json=LONG_CHAT, timeout=30)
        assert_timeout_error(r, "request_timeout_seconds")
        assert timeouts(server.url, "chat") == before + 1
        r = httpx.post(server.url + CHAT, json={**LONG_CHAT, "max_tokens": 200, "timeout": 60}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200, r.text
        assert wait_for(lambda: engine_idle(server))


def test_the_server_cap_cuts_a_longer_request_timeout(slow_engine: AsyncEngine) -> None:
    with run_live_server(slow_engine, served_model_name="tiny", max_request_timeout_seconds=0.3) as server:
        headers = {"X-Request-Timeout": "120"}
        r = httpx.post(server.url + COMPLETIONS, json={**LONG_COMPLETION, "timeout": 60}, headers=headers)
        assert_timeout_error(r, "max_request_timeout_seconds")
        r = httpx.post(server.url + COMPLETIONS, json=LONG_COMPLETION, timeout=30)  # none: the cap applies
        assert_timeout_error(r, "max_request_timeout_seconds")
        assert wait_for(lambda: engine_idle(server))


def test_kiln_serve_flags_set_the_default_and_cap_over_the_engine_process(tiny_gqa_dir: Path) -> None:
    # `kiln serve` as deployed: flags, and the engine in its child process (ProcessEngine), at full
    # speed: the longest completion takes ~1.5 s on 2 CPU cores.
    flags = ("--request-timeout-seconds", "0.1", "--max-request-timeout-seconds", "0.2")
    proc, url, log = start_cli_server(tiny_gqa_dir, *flags)
    try:
        r = httpx.post(url + COMPLETIONS, json=LONG_COMPLETION, timeout=30)
        assert_timeout_error(r, "request_timeout_seconds")
        r = httpx.post(url + COMPLETIONS, json={**LONG_COMPLETION, "timeout": 60}, timeout=30)
        assert_timeout_error(r, "max_request_timeout_seconds")
        assert timeouts(url, "completions") == 2
        assert wait_for(
            lambda: (
                metric(url, "kiln_kv_cache_usage_ratio") == 0
                and metric(url, "kiln_num_requests_running") == 0
            )
        )
        r = httpx.post(url + COMPLETIONS, json={**LONG_COMPLETION, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in "".join(log)


# --- queued, stalled, and already late -----------------------------------------------------------


def test_a_queued_request_past_its_deadline_leaves_the_queue_before_it_runs(tiny_gqa_dir: Path) -> None:
    # One running slot, held by a stream: the request behind it waits in the engine's queue. Each step
    # takes 5 ms more, so the blocker (1,000 tokens) outlasts the queued request's 1 s deadline.
    engine = open_tiny_engine(tiny_gqa_dir, max_num_seqs=1)
    slow_steps(engine, 0.005)
    try:
        with run_live_server(engine, served_model_name="tiny") as server:
            url = server.url + CHAT
            # Keep the line iterators referenced: httpx closes a response when its iterator is collected.
            with httpx.stream("POST", url, json={**LONG_CHAT, "stream": True}, timeout=30) as blocker:
                blocker_lines = blocker.iter_lines()
                assert next(line for line in blocker_lines if line.startswith("data: {"))
                queued_body = {**LONG_CHAT, "stream": True, "timeout": 1.0}
                with httpx.stream("POST", url, json=queued_body, timeout=30) as queued:
                    events = (line[6:] for line in queued.iter_lines() if line.startswith("data: "))
                    first = json.loads(next(events))
                    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                    assert wait_for(lambda: engine.stats().num_waiting == 1)
                    rest = list(events)  # the deadline ends it while it still waits
                assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "request_timeout"
                assert all(not json.loads(e)["choices"][0]["delta"] for e in rest[:-2])  # no token came
                # out of the queue while the blocker still runs
                assert wait_for(lambda: engine.stats().num_waiting == 0)
                assert engine.stats().num_running == 1
            assert wait_for(lambda: engine_idle(server))
            assert timeouts(server.url, "chat") == 1
    finally:
        asyncio.run(engine.shutdown())


class StalledEngine(_Wrapper):
    """An engine whose step loop is stuck: a request never produces anything and an abort is not
    acknowledged until the test calls `resume()`."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._resume = threading.Event()
        self.aborted: list[str] = []
        self.acknowledged: list[str] = []

    def resume(self) -> None:
        self._resume.set()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        await asyncio.Event().wait()  # no output, ever
        yield  # type: ignore[misc]  # (an async generator)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        while not self._resume.is_set():
            await asyncio.sleep(0.01)
        self.acknowledged.append(request_id)


def test_the_deadline_holds_while_the_engine_is_stalled(tiny_engine: AsyncEngine) -> None:
    stalled = StalledEngine(tiny_engine)
    try:
        with run_live_server(stalled, served_model_name="tiny") as server:  # type: ignore[arg-type]
            before = timeouts(server.url, "chat")
            # The answer comes at the deadline, not when the stuck engine acknowledges the abort.
            r = httpx.post(server.url + CHAT, json={**SHORT_CHAT, "timeout": 0.3}, timeout=30)
            assert_timeout_error(r, "timeout")
            assert len(stalled.aborted) == 1 and not stalled.acknowledged  # the abort was sent, is pending
            assert timeouts(server.url, "chat") == before + 1
            events = stream_events(server.url, CHAT, SHORT_CHAT, headers={"X-Request-Timeout": "0.3"})
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
            assert len(stalled.aborted) == 2 and not stalled.acknowledged
            stalled.resume()
            assert wait_for(lambda: len(stalled.acknowledged) == 2)
            assert server.state.admission.waiting_requests == 0 and not server.state.open_generations
    finally:
        stalled.resume()


def test_a_request_already_late_when_it_would_start_never_reaches_the_engine(
    tiny_engine: AsyncEngine,
) -> None:
    recording = RecordingEngine(tiny_engine)
    with run_live_server(recording, served_model_name="tiny") as server:  # type: ignore[arg-type]
        state = server.state

        async def scenario() -> None:
            generation = Generation(
                state,
                request_id="late",
                http_request_id="h-late",
                endpoint="completions",
                prompts=[Prompt([5, 6, 7])],
                params=SamplingParams(max_tokens=8),
                priority=0,
                ticket=state.admission.admit(1, 11),
                stream=False,
                deadline=Deadline(at=time.monotonic() - 0.01, seconds=1.0, source="timeout"),
            )
            generation.start()
            with pytest.raises(RequestTimeoutError):
                async for _ in generation.outputs():
                    pass
            await generation.aclose()

        asyncio.run(scenario())
        assert recording.calls == []
        assert timeouts(server.url, "completions") == 1
        assert state.admission.waiting_requests == 0


# --- documented ------------------------------------------------------------------------------------


def test_openapi_documents_the_field_the_header_and_the_504(live: LiveServer) -> None:
    doc = httpx.get(f"{live.url}/openapi.json").json()
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        field = doc["components"]["schemas"][model]["properties"]["timeout"]
        number = next(s for s in field["anyOf"] if s.get("type") == "number")
        assert number == {"type": "number", "exclusiveMinimum": 0, "maximum": 86_400}
        assert "X-Request-Timeout" in field["description"]
    for path in (CHAT, COMPLETIONS):
        op = doc["paths"][path]["post"]
        header = next(p for p in op["parameters"] if p["name"] == "X-Request-Timeout")
        assert header["in"] == "header" and not header.get("required")
        assert {"type": "number", "exclusiveMinimum": 0, "maximum": 86_400} in header["schema"]["anyOf"]
        timeout = op["responses"]["504"]
        assert timeout["content"] == {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
        }
        assert timeout["headers"]["x-should-retry"]["required"] is True
