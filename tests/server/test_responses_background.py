"""Background responses (`background: true`) on the tiny native engine: answered at once and made by the
server, read back while they run and after, their events replayed and followed, cancelled (blocks
freed), failed by a deadline, and cancelled when the server stops."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from server_harness import LiveServer, run_live_server, wait_for

from kiln.clients.thread import AsyncEngine

# Long enough (hundreds of engine steps) that the response still runs when the next call arrives.
LONG: dict[str, Any] = {
    "model": "tiny",
    "input": "Tell me a story",
    "max_output_tokens": 900,
    "temperature": 0,
    "extra_body": {"ignore_eos": True},
}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _finished(client: openai.OpenAI, response_id: str) -> Any:
    def done() -> bool:
        return client.responses.retrieve(response_id).status not in ("queued", "in_progress")

    assert wait_for(done, timeout=60)
    return client.responses.retrieve(response_id)


def test_a_background_response_is_answered_at_once_and_read_back(client: openai.OpenAI) -> None:
    args = {**LONG, "max_output_tokens": 200}
    queued = client.responses.create(**args, background=True)
    assert (queued.status, queued.background, queued.output, queued.usage) == ("queued", True, [], None)
    final = _finished(client, queued.id)
    foreground = client.responses.create(**args)
    assert final.status == "incomplete" and final.usage.output_tokens == 200
    assert final.output_text == foreground.output_text  # greedy: the same text
    assert foreground.background is False


def test_cancel_stops_a_running_response_and_frees_its_blocks(
    client: openai.OpenAI, server: LiveServer
) -> None:
    started = client.responses.create(**LONG, background=True)
    running = client.responses.retrieve(started.id)
    assert running.status in ("queued", "in_progress")
    deleting = httpx.delete(f"{server.url}/v1/responses/{started.id}")
    assert deleting.status_code == 400 and deleting.json()["error"]["param"] == "response_id"
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.id == started.id
    assert wait_for(
        lambda: server.engine.stats().kv_blocks_used == 0 and server.engine.stats().num_running == 0
    )
    assert client.responses.retrieve(started.id).status == "cancelled"
    assert client.responses.cancel(started.id).status == "cancelled"  # a finished one, as it is
    # Its stream, replayed, ends with the cancellation.
    events = list(client.responses.retrieve(started.id, stream=True))
    assert events[-1].type == "error" and events[-1].code == "cancelled"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_background_stream_resumes_where_it_was_left(client: openai.OpenAI) -> None:
    stream = client.responses.create(**{**LONG, "max_output_tokens": 300}, background=True, stream=True)
    first = []
    for event in stream:
        first.append(event)
        if len(first) == 8:
            break
    stream.close()  # the client goes away; the response goes on
    response_id = first[0].response.id
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number))
    events = first + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == _finished(client, response_id).output_text == events[-1].response.output_text


def test_a_deadline_fails_a_background_response(client: openai.OpenAI) -> None:
    late = client.responses.create(
        **{**LONG, "extra_body": {"ignore_eos": True, "timeout": 0.2}}, background=True
    )
    failed = _finished(client, late.id)
    assert failed.status == "failed" and failed.error.code == "request_timeout"
    assert all(item.status == "incomplete" for item in failed.output)  # what it wrote stays


def test_what_background_does_not_take(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**LONG, background=True, store=False)
    assert refused.value.body["param"] == "store"
    foreground = client.responses.create(**{**LONG, "max_output_tokens": 2})
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(foreground.id)
    assert refused.value.body["param"] == "response_id"
    url = f"{server.url}/v1/responses/{foreground.id}"
    assert httpx.get(url, params={"stream": "true"}).json()["error"]["param"] == "stream"
    assert httpx.get(url, params={"starting_after": 3}).json()["error"]["param"] == "starting_after"
    assert httpx.post(f"{server.url}/v1/responses/resp_nope/cancel").status_code == 404


def test_stopping_the_server_cancels_what_runs(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny") as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        started = client.responses.create(**LONG, background=True)
        assert client.responses.retrieve(started.id).status in ("queued", "in_progress")
    stats = tiny_engine.stats
    assert wait_for(lambda: stats().kv_blocks_used == 0 and stats().num_running == 0)
