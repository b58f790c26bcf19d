"""OpenAI's Responses API (`/v1/responses`) through the official client, on the tiny native engine: a
response is the chat completion of the same conversation, streamed as OpenAI's named events, chained
with previous_response_id, stored, read back and deleted; function calls and their outputs as items;
text formats and logprobs; what it does not support is a 400 naming the field."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_harness import LiveServer, run_live_server, wait_for
from third_party import DOCS, no_field_ignored
from weather_tool import ASK, WEATHER, WEATHER_TOOL

from kiln.build.default_model import DEFAULT_MODEL_NAME
from kiln.clients.thread import AsyncEngine

GREEDY: dict[str, Any] = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}
# A forced call's grammar ends the output at its end, which ignore_eos would run past.
UNTIL_EOS: dict[str, Any] = {"model": "tiny", "temperature": 0}
FLAT_WEATHER = {"type": "function", **WEATHER_TOOL["function"]}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], tokens: int, **kw: Any) -> Any:
    return client.chat.completions.create(messages=messages, max_tokens=tokens, **GREEDY, **kw)


def test_a_response_is_the_chat_completion_of_its_conversation(client: openai.OpenAI) -> None:
    r = client.responses.create(input="Hello there", instructions="Be brief.", max_output_tokens=8, **GREEDY)
    chat = _chat(
        client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], 8
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    # It ran out of tokens: incomplete, and so is its message.
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert message.id.startswith("msg_")
    assert (r.instructions, r.max_output_tokens, r.temperature, r.store) == ("Be brief.", 8, 0, True)


def test_input_items_render_as_the_same_messages(client: openai.OpenAI) -> None:
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Salut"}]},
        {"role": "user", "content": "Again"},
    ]
    r = client.responses.create(input=items, max_output_tokens=6, **GREEDY)
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "Again"},
    ]
    chat = _chat(client, messages, 6)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_stream_is_openais_named_events(client: openai.OpenAI, server: LiveServer) -> None:
    args = {"input": "Hello there", "max_output_tokens": 8, **GREEDY}
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-1].response.output_text
    assert events[-1].response.id == events[0].response.id
    assert events[-1].response.usage.output_tokens == 8
    # On the wire: `event:` lines naming each, no [DONE].
    with httpx.stream(
        "POST", f"{server.url}/v1/responses", json={"input": "Hi", "max_output_tokens": 3, "stream": True}
    ) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[0] == "event: response.created" and lines[1].startswith("data: {")
    assert lines[-2] in ("event: response.completed", "event: response.incomplete")
    assert "data: [DONE]" not in lines


def test_previous_response_id_continues_without_its_instructions(client: openai.OpenAI) -> None:
    first = client.responses.create(input="Hi", instructions="Be brief.", max_output_tokens=5, **GREEDY)
    second = client.responses.create(
        input="And then?", previous_response_id=first.id, max_output_tokens=5, **GREEDY
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    chat = _chat(client, messages, 5)
    assert second.previous_response_id == first.id
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    # The chain holds when its first link is gone: each response keeps its whole conversation.
    client.responses.delete(first.id)
    third = client.responses.create(
        input="More", previous_response_id=second.id, max_output_tokens=3, **GREEDY
    )
    chat = _chat(
        client,
        [
            *messages,
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "More"},
        ],
        3,
    )
    assert third.output_text == chat.choices[0].message.content


def test_stored_responses_are_read_back_and_deleted(client: openai.OpenAI, server: LiveServer) -> None:
    r = client.responses.create(input="Hi", max_output_tokens=4, metadata={"run": "7"}, **GREEDY)
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()
    assert r.metadata == {"run": "7"}
    deleted = httpx.delete(f"{server.url}/v1/responses/{r.id}").json()
    assert deleted == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(input="Hi", previous_response_id=r.id, **GREEDY)
    assert gone.value.body["code"] == "previous_response_not_found"
    assert gone.value.body["param"] == "previous_response_id"
    assert httpx.delete(f"{server.url}/v1/responses/{r.id}").status_code == 404
    unstored = client.responses.create(input="Hi", max_output_tokens=2, store=False, **GREEDY)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_input_items_list_what_a_response_was_made_from(client: openai.OpenAI, server: LiveServer) -> None:
    items = [
        {"role": "user", "content": "Hi", "id": "msg_mine"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "user", "content": "Thanks"},
    ]
    r = client.responses.create(input=items, tools=[FLAT_WEATHER], max_output_tokens=2, **GREEDY)
    listed = client.responses.input_items.list(r.id, order="asc")
    assert [(i.type, getattr(i, "role", None)) for i in listed.data] == [
        ("message", "user"),
        ("message", "assistant"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "user"),
    ]
    first, _, call, output, last = listed.data
    assert first.id == "msg_mine" and first.content[0].type == "input_text" and first.content[0].text == "Hi"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", "{}")
    assert (output.call_id, output.output) == ("call_1", "sunny")
    assert last.content[0].text == "Thanks" and not listed.has_more
    # Newest first by default; pages of `limit` after an id.
    url = f"{server.url}/v1/responses/{r.id}/input_items"
    page = httpx.get(url, params={"limit": 2}).json()
    assert [i["id"] for i in page["data"]] == [last.id, output.id] and page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (last.id, output.id)
    page = httpx.get(url, params={"limit": 2, "after": output.id}).json()
    assert [i["id"] for i in page["data"]] == [call.id, listed.data[1].id] and page["has_more"] is True
    assert httpx.get(url, params={"after": "msg_nope"}).json()["error"]["param"] == "after"
    assert httpx.get(url, params={"limit": 0}).status_code == 400
    assert httpx.get(f"{server.url}/v1/responses/resp_nope/input_items").status_code == 404
    plain = client.responses.create(input="Hi", max_output_tokens=1, **GREEDY)
    [message] = client.responses.input_items.list(plain.id).data
    assert (message.role, message.content[0].text) == ("user", "Hi")


@pytest.fixture(scope="module")
def small_store(tiny_engine: AsyncEngine) -> Iterator[openai.OpenAI]:
    with run_live_server(tiny_engine, served_model_name="tiny", responses_store_size=2) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_the_store_drops_the_least_recently_used(small_store: openai.OpenAI) -> None:
    a, b = (small_store.responses.create(input=t, max_output_tokens=1, **GREEDY) for t in "ab")
    small_store.responses.retrieve(a.id)  # a is now the more recently used
    c = small_store.responses.create(input="c", max_output_tokens=1, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        small_store.responses.retrieve(b.id)
    assert {small_store.responses.retrieve(x.id).id for x in (a, c)} == {a.id, c.id}


def test_a_server_keeping_none_stores_nothing(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", responses_store_size=0) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        r = client.responses.create(input="Hi", max_output_tokens=2, **GREEDY)
        assert r.store is False
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(input="Hi", max_output_tokens=2, store=True, **GREEDY)
        assert refused.value.body["param"] == "store"


def test_function_calls_and_their_outputs_are_items(client: openai.OpenAI) -> None:
    choice = {"type": "function", "name": "get_weather"}
    r = client.responses.create(
        input=ASK,
        tools=[FLAT_WEATHER],
        tool_choice=choice,
        parallel_tool_calls=False,
        max_output_tokens=300,
        **UNTIL_EOS,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and r.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"
    # The calls and their outputs sent back render as chat's tool calls and tool messages.
    back = [
        *ASK,
        *(
            {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
            for c in calls
        ),
        *({"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls),
    ]
    answer = client.responses.create(
        input=back, tools=[FLAT_WEATHER], max_output_tokens=6, tool_choice="none", **GREEDY
    )
    tool_calls = [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        *({"role": "tool", "tool_call_id": c.call_id, "content": "sunny"} for c in calls),
    ]
    chat = _chat(client, messages, 6, tools=[WEATHER_TOOL], tool_choice="none")
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_function_calls(client: openai.OpenAI) -> None:
    args = {
        "input": ASK,
        "tools": [FLAT_WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_output_tokens": 300,
        **UNTIL_EOS,
    }
    events = list(client.responses.create(**args, stream=True))
    final = events[-1].response
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and events[-1].type == "response.completed"
    for index, call in enumerate(final.output):
        if call.type != "function_call":
            continue
        fragments = [
            e.delta
            for e in events
            if e.type == "response.function_call_arguments.delta" and e.output_index == index
        ]
        done = [
            e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index
        ]
        assert "".join(fragments) == done[0].arguments == call.arguments
        jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_text_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "name": "forecast", "schema": WEATHER, "strict": True}
    r = client.responses.create(input="Weather?", text={"format": fmt}, max_output_tokens=300, **UNTIL_EOS)
    jsonschema.validate(json.loads(r.output_text), WEATHER)
    assert r.text.format.type == "json_schema" and r.text.format.name == "forecast"


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=5)


def test_reasoning_that_asks_for_none_is_taken(client: openai.OpenAI) -> None:
    r = client.responses.create(input="Hi", max_output_tokens=2, reasoning={"effort": "none"}, **GREEDY)
    assert r.status == "incomplete"


def test_the_sdks_parse_and_stream_helpers(client: openai.OpenAI) -> None:
    args = {"input": "Weather?", "text_format": Forecast, "max_output_tokens": 100, **UNTIL_EOS}
    with no_field_ignored():
        parsed = client.responses.parse(**args)
        with client.responses.stream(**args) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
    assert isinstance(parsed.output_parsed, Forecast) and parsed.status == "completed"
    assert final.output_parsed == parsed.output_parsed  # greedy: the same forecast
    assert "".join(deltas) == final.output_text


def test_logprobs_are_included_when_asked(client: openai.OpenAI) -> None:
    r = client.responses.create(
        input="Hello there",
        max_output_tokens=5,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        **GREEDY,
    )
    chat = _chat(client, [{"role": "user", "content": "Hello there"}], 5, logprobs=True, top_logprobs=2)
    got = r.output[0].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert [(lp.token, lp.logprob, len(lp.top_logprobs)) for lp in got] == [
        (lp.token, lp.logprob, len(lp.top_logprobs)) for lp in want
    ]
    events = list(client.responses.create(
        input="Hello there", max_output_tokens=5, include=["message.output_text.logprobs"], top_logprobs=2,
        stream=True, **GREEDY,
    ))  # fmt: skip
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.logprob for lp in streamed] == [lp.logprob for lp in want]
    plain = client.responses.create(input="Hello there", max_output_tokens=2, **GREEDY)
    assert plain.output[0].content[0].logprobs is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
        ({"input": [{"content": "no role"}]}, "input.0"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content",
        ),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"tools": [FLAT_WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"background": True, "store": False}, "store"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"reasoning": {"summary": "auto"}}, "reasoning"),
        ({"truncation": "middle"}, "truncation"),
        ({"include": ["bogus"]}, "include"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"metadata": {str(i): "x" for i in range(17)}}, "metadata"),
        ({"service_tier": "flex"}, "service_tier"),
    ],
)
def test_what_is_not_supported_is_a_400_naming_it(
    server: LiveServer, fields: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{server.url}/v1/responses", json={"input": "Hi", "max_output_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_truncation_auto_leaves_out_the_oldest_turns(client: openai.OpenAI, server: LiveServer) -> None:
    limit = httpx.get(f"{server.url}/v1/models/tiny").json()["max_model_len"]
    turn = " ".join(f"w{i}" for i in range(limit // 6))  # a few turns fill the context
    items = []
    for i in range(8):
        items += [{"role": "user", "content": f"{i}: {turn}"}, {"role": "assistant", "content": f"ok {i}"}]
    items.append({"role": "user", "content": "last"})
    with pytest.raises(openai.BadRequestError) as refused:  # truncation "disabled", the default
        client.responses.create(input=items, max_output_tokens=4, **GREEDY)
    assert refused.value.body["code"] == "context_length_exceeded"
    r = client.responses.create(input=items, max_output_tokens=4, truncation="auto", **GREEDY)
    # What it kept: the longest run of turns from a user message on that leaves room for the output.
    counts = {
        start: httpx.post(f"{server.url}/tokenize", json={"messages": items[start:]}).json()["count"]
        for start in range(0, len(items), 2)
    }
    kept = min(start for start, count in counts.items() if count + 4 <= limit)
    assert kept > 0 and r.usage.input_tokens == counts[kept]
    assert r.output_text == _chat(client, items[kept:], 4).choices[0].message.content
    assert r.truncation == "auto"
    # Stored whole: the next turn truncates again from the full conversation.
    after = client.responses.create(
        input="more", previous_response_id=r.id, max_output_tokens=4, truncation="auto", **GREEDY
    )
    assert after.usage.input_tokens <= limit - 4
    # A last message that alone is too long is a 400 still.
    with pytest.raises(openai.BadRequestError):
        client.responses.create(input=turn * 8, max_output_tokens=4, truncation="auto", **GREEDY)


def test_an_error_mid_stream_is_an_error_event(server: LiveServer) -> None:
    body = {
        "input": "Tell me a story",
        "max_output_tokens": 900,
        "ignore_eos": True,
        "stream": True,
        "timeout": 0.3,
    }
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "request_timeout"
    assert events[-1]["sequence_number"] == len(events) - 1


def test_a_client_gone_mid_stream_frees_its_request(server: LiveServer) -> None:
    engine = server.engine
    body = {"input": "Tell me a story", "max_output_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()  # referenced: httpx closes a response when its iterator is collected
        deltas = 0
        for line in lines:
            deltas += line == "event: response.output_text.delta"
            if deltas == 3:
                break
        assert engine.stats().kv_blocks_used > 0
    assert wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0)


def test_the_docs_example_runs_and_sends_no_field_kiln_ignores(tiny_engine: AsyncEngine) -> None:
    section = DOCS.read_text().split("\n## Responses API\n", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    with run_live_server(tiny_engine, served_model_name=DEFAULT_MODEL_NAME) as live:
        code = example.replace("http://127.0.0.1:8000", live.url)
        assert code != example, "the example's URL changed: update this test"
        printed, scope = io.StringIO(), {"__name__": "__docs__"}
        with no_field_ignored(), contextlib.redirect_stdout(printed):
            exec(compile(code, "docs/server.md", "exec"), scope)
    first, second = scope["first"], scope["second"]
    assert printed.getvalue().startswith(first.output_text + "\n" + second.output_text)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn came along


def test_langchain_over_the_responses_api(server: LiveServer) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model="tiny",
        use_responses_api=True,
        temperature=0,
        max_tokens=300,
    )
    with no_field_ignored():
        call = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather", parallel_tool_calls=False).invoke(
            "What is the weather in Oslo?"
        )
        [tool_call] = call.tool_calls
        jsonschema.validate(tool_call["args"], WEATHER)
        # The call goes back as a function_call item, its result as a function_call_output.
        history = [
            HumanMessage("What is the weather in Oslo?"),
            call,
            ToolMessage("sunny", tool_call_id=tool_call["id"]),
        ]
        answer = llm.bind_tools([WEATHER_TOOL]).invoke(history)
    assert answer.response_metadata["status"] in ("completed", "incomplete")
    assert answer.response_metadata["id"].startswith("resp_")
