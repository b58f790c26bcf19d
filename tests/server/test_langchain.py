"""LangChain's `ChatOpenAI` against a real server: `with_structured_output` (json_schema and
function_calling) gives validated pydantic objects, `bind_tools` with a forced or named choice gives tool
calls, the loop call -> tool result -> final answer completes, streamed tool-call chunks add up to a valid
call; the docs' example runs as written on the default model. On the tiny model the output is random and
only the grammar holds it to the schema, so a validated object means the constraint reached the engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import pydantic
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from server_harness import LiveServer
from third_party import default_model_server, docs_example, loopback_only, no_field_ignored

# LangChain serializes the parsed object into a field typed None (its own warning, not Kiln's).
pytestmark = pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog"]
    name: str = pydantic.Field(max_length=6)


class Person(pydantic.BaseModel):
    """A person."""

    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)
    nickname: str | None = pydantic.Field(default=None, max_length=5)
    pets: list[Pet] = pydantic.Field(max_length=2)


@tool
def get_weather(
    city: Annotated[str, pydantic.Field(max_length=8)], days: Annotated[int, pydantic.Field(ge=1, le=5)]
) -> str:
    """The forecast for a city."""
    return f"sunny in {city} for {days} days"


@tool
def get_time(zone: Literal["utc", "cet"]) -> str:
    """The time now in a zone."""
    return f"noon {zone}"


TOOLS = [get_weather, get_time]


@pytest.fixture(autouse=True, scope="module")
def _offline() -> Iterator[None]:
    with loopback_only():
        yield


@pytest.fixture
def sent() -> list[dict[str, Any]]:
    """The JSON bodies LangChain posted, in order (read off its own HTTP client)."""
    return []


@pytest.fixture(autouse=True)
def _every_field_used() -> Iterator[None]:
    with no_field_ignored():
        yield


def _chat(server: LiveServer, **clients: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model="tiny",
        max_tokens=300,
        temperature=1.0,
        seed=3,
        max_retries=0,
        **clients,
    )


@pytest.fixture
def llm(server: LiveServer, sent: list[dict[str, Any]]) -> Iterator[ChatOpenAI]:
    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    with httpx.Client(event_hooks={"request": [record]}, timeout=120) as http:
        yield _chat(server, http_client=http)


def _parameters(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The JSON schema LangChain sent for a tool's arguments."""
    return next(t["function"]["parameters"] for t in body["tools"] if t["function"]["name"] == name)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_validated_model(
    server: LiveServer, llm: ChatOpenAI, sent: list[dict[str, Any]], method: str
) -> None:
    structured = llm.with_structured_output(Person, method=method, strict=True, include_raw=True)
    out = structured.invoke("Describe a person.")
    assert out["parsing_error"] is None and isinstance(out["parsed"], Person)
    raw = out["raw"]
    [body] = sent
    if method == "json_schema":
        assert body["response_format"]["type"] == "json_schema"
        assert raw.response_metadata["finish_reason"] == "stop"
        assert Person.model_validate_json(raw.content) == out["parsed"]
    else:  # a tool named after the model, forced by tool_choice: the call's arguments are the object
        assert body["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
        assert raw.response_metadata["finish_reason"] == "tool_calls"
        [call] = raw.tool_calls
        assert call["name"] == "Person" and Person.model_validate(call["args"]) == out["parsed"]
    # Streamed, the same seeded request parses to the same object; async too.
    streamed = list(
        llm.with_structured_output(Person, method=method, strict=True).stream("Describe a person.")
    )
    assert streamed[-1] == out["parsed"]

    async def ainvoke() -> Any:
        # Its own async client: LangChain's shared default one would outlive this event loop.
        async with httpx.AsyncClient(timeout=120) as http:
            chat = _chat(server, http_async_client=http)
            return await chat.with_structured_output(Person, method=method, strict=True).ainvoke(
                "Describe a person."
            )

    assert asyncio.run(ainvoke()) == out["parsed"]


@pytest.mark.parametrize("choice", ["any", "get_weather"])
def test_bind_tools_loop_call_tool_result_final_answer(
    llm: ChatOpenAI, sent: list[dict[str, Any]], choice: str
) -> None:
    agent = llm.bind_tools(TOOLS, tool_choice=choice, strict=True, parallel_tool_calls=False)
    messages: list[Any] = [HumanMessage("What is the weather in Oslo?")]
    reply = agent.invoke(messages)
    assert isinstance(reply, AIMessage) and reply.invalid_tool_calls == []
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    [call] = reply.tool_calls
    if choice != "any":
        assert call["name"] == choice
    parameters = _parameters(sent[0], call["name"])
    assert parameters["additionalProperties"] is False  # strict=True: nothing the schema does not name
    jsonschema.validate(call["args"], parameters)
    result = next(t for t in TOOLS if t.name == call["name"]).invoke(call)  # the tool runs: a ToolMessage
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    messages += [reply, result]

    final = llm.bind_tools(TOOLS).invoke(messages, max_tokens=12)
    assert isinstance(final, AIMessage) and final.tool_calls == []
    assert final.response_metadata["finish_reason"] in {"stop", "length"}
    assert final.usage_metadata["output_tokens"] >= 1
    # The second request carried the call and its result as OpenAI messages.
    history = sent[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    [sent_call] = history[1]["tool_calls"]
    assert sent_call["id"] == call["id"] and json.loads(sent_call["function"]["arguments"]) == call["args"]
    assert history[2] == {"role": "tool", "tool_call_id": call["id"], "content": result.content}


def test_streamed_tool_call_chunks_add_up_to_the_whole_call(
    llm: ChatOpenAI, sent: list[dict[str, Any]]
) -> None:
    agent = llm.bind_tools(TOOLS, tool_choice="get_weather", strict=True, parallel_tool_calls=False)
    chunks = list(agent.stream("What is the weather in Oslo?"))
    assert sent[0]["stream"] is True
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    with_args = [c for c in chunks if c.tool_call_chunks and c.tool_call_chunks[0]["args"]]
    assert len(with_args) > 1, "the arguments should arrive in fragments"
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    [piece] = merged.tool_call_chunks
    assert piece["name"] == "get_weather" and piece["id"].startswith("call_") and piece["index"] == 0
    [call] = merged.tool_calls
    jsonschema.validate(call["args"], _parameters(sent[0], "get_weather"))
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    whole = agent.invoke("What is the weather in Oslo?")  # seeded: the same call without streaming
    assert (whole.tool_calls[0]["name"], whole.tool_calls[0]["args"]) == (call["name"], call["args"])


# ---------------------------------------------------------------------------------------------------
# the default model (SmolLM2-135M-Instruct): the docs' example, as written


@pytest.fixture(scope="module")
def default_url(smollm2_gguf: Path) -> Iterator[str]:  # the GGUF fixture fetches it once per session
    with default_model_server() as url:
        yield url


def test_the_docs_example_runs_on_the_default_model(default_url: str) -> None:
    example = docs_example("langchain_openai")
    code = example.replace("http://127.0.0.1:8000", default_url)
    assert code != example, "the example's URL changed: update this test"
    printed, scope = io.StringIO(), {"__name__": "__docs__"}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/server.md", "exec"), scope)
    answer, final = printed.getvalue().strip().split("\n", 1)
    assert answer == "city='Paris' country='France'"  # greedy, held to the schema
    [call] = scope["call"].tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    assert isinstance(scope["messages"][-1], ToolMessage)
    assert "sunny" in final.lower()  # the final answer read the tool's result
