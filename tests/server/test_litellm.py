"""LiteLLM against a real server, as `openai/<served name>` at `api_base`: a plain completion, a pydantic
`response_format`, tools with `tool_choice="required"` and the tool result sent back, streamed tool calls
put together by `litellm.stream_chunk_builder`, `litellm.responses` whole and streamed; the docs'
example runs as written on the default model.
LiteLLM stays offline: its packaged price list (`LITELLM_LOCAL_MODEL_COST_MAP`), no callbacks, no
per-chunk logging, and any connection beyond loopback fails the test."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import httpx
import jsonschema
import pydantic
import pytest
from server_harness import LiveServer
from third_party import NetworkUsed, default_model_server, docs_example, loopback_only, no_field_ignored
from weather_tool import ASK, WEATHER, WEATHER_TOOL

# LiteLLM's own pydantic types warn as it builds them (ReadOnly TypedDict items); nothing of Kiln's.
pytestmark = pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning")

TOOLS = [WEATHER_TOOL]


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    tags: list[Literal["a", "b"]] = pydantic.Field(max_length=2)


@pytest.fixture(scope="module")
def litellm() -> Iterator[ModuleType]:
    """LiteLLM, imported here (it takes seconds) and set up to stay off the network and quiet."""
    with pytest.MonkeyPatch.context() as mp, loopback_only():
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read at import: else it fetches prices
        import litellm  # deferred: a seconds-long import, paid only where these tests run

        for name in ("callbacks", "success_callback", "failure_callback"):
            mp.setattr(litellm, name, [])
        mp.setattr(litellm, "disable_streaming_logging", True)  # no logging task per streamed chunk
        mp.setattr(litellm, "suppress_debug_info", True)
        yield litellm


@pytest.fixture(autouse=True)
def _every_field_used() -> Iterator[None]:
    with no_field_ignored():
        yield


@pytest.fixture(scope="module")
def target(server: LiveServer) -> dict[str, Any]:
    """What routes LiteLLM to the server: the openai/ provider at api_base."""
    return {
        "model": "openai/tiny",
        "api_base": f"{server.url}/v1",
        "api_key": "unused",
        "max_retries": 0,
        "timeout": 120,
    }


def test_the_network_guard_holds() -> None:
    with loopback_only(), socket.socket() as sock, pytest.raises(NetworkUsed):
        sock.connect(("192.0.2.1", 443))  # TEST-NET-1: refused before anything is sent


def test_plain_completion_is_the_servers_answer(
    litellm: ModuleType, target: dict[str, Any], server: LiveServer
) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    reply = litellm.completion(**target, messages=messages, max_tokens=8, temperature=0)
    direct = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0},
        timeout=60,
    ).json()
    choice = reply.choices[0]
    assert choice.message.content == direct["choices"][0]["message"]["content"]  # greedy: the same text
    assert choice.message.content and choice.finish_reason == direct["choices"][0]["finish_reason"]
    assert reply.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert reply.usage.prompt_tokens == direct["usage"]["prompt_tokens"]


def test_a_pydantic_response_format_whole_and_streamed(litellm: ModuleType, target: dict[str, Any]) -> None:
    args = {**target, "messages": [{"role": "user", "content": "Describe a person."}], "seed": 3}
    reply = litellm.completion(**args, response_format=Person, max_tokens=200)
    assert reply.choices[0].finish_reason == "stop"
    person = Person.model_validate_json(reply.choices[0].message.content)  # random weights, held to it
    chunks = list(litellm.completion(**args, response_format=Person, max_tokens=200, stream=True))
    built = litellm.stream_chunk_builder(chunks, messages=args["messages"])
    assert Person.model_validate_json(built.choices[0].message.content) == person  # seeded: the same


def test_required_tools_then_the_tool_result_and_a_final_answer(
    litellm: ModuleType, target: dict[str, Any], server: LiveServer
) -> None:
    reply = litellm.completion(
        **target,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        seed=1,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    final = litellm.completion(**target, messages=history, tools=TOOLS, max_tokens=8, seed=1)
    assert final.choices[0].finish_reason in {"stop", "length"}
    assert final.choices[0].message.tool_calls is None
    # The server rendered exactly that history, the tool's result included: /tokenize renders a
    # conversation as chat does, so its count is the prompt the final answer was given.
    rendered = httpx.post(
        f"{server.url}/tokenize", json={"messages": history, "tools": TOOLS}, timeout=60
    ).json()
    assert final.usage.prompt_tokens == rendered["count"]
    without_result = httpx.post(
        f"{server.url}/tokenize", json={"messages": history[:2], "tools": TOOLS}, timeout=60
    ).json()
    assert rendered["count"] > without_result["count"]


def test_streamed_tool_calls_put_together_by_stream_chunk_builder(
    litellm: ModuleType, target: dict[str, Any]
) -> None:
    args = {
        **target,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "max_tokens": 200,
        "seed": 2,
    }
    chunks = list(litellm.completion(**args, stream=True))
    fragments = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(fragments) > 1, "a streamed call arrives in pieces"
    built = litellm.stream_chunk_builder(chunks, messages=ASK)
    assert built.choices[0].finish_reason == "tool_calls"
    [call] = built.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    [whole] = litellm.completion(**args).choices[0].message.tool_calls  # seeded: the same call whole
    assert (whole.function.name, whole.function.arguments) == (call.function.name, call.function.arguments)


# ---------------------------------------------------------------------------------------------------
# the default model (SmolLM2-135M-Instruct): the docs' example, as written


@pytest.fixture(scope="module")
def default_url(smollm2_gguf: Path) -> Iterator[str]:  # the GGUF fixture fetches it once per session
    with default_model_server() as url:
        yield url


# LiteLLM's stream turns the usage into its chat shape and pydantic warns as it serializes it.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_the_responses_api_through_litellm(
    litellm: ModuleType, target: dict[str, Any], server: LiveServer
) -> None:
    # 16: LiteLLM raises a smaller max_output_tokens to OpenAI's least.
    args = {"input": "Hello there", "max_output_tokens": 16, "temperature": 0}
    reply = litellm.responses(**target, **args)
    direct = httpx.post(f"{server.url}/v1/responses", json={**args, "store": False}).json()
    assert reply.id.startswith("resp_") and reply.status == direct["status"]
    assert reply.output[0].content[0].text == direct["output"][0]["content"][0]["text"]
    events = list(litellm.responses(**target, **args, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == direct["output"][0]["content"][0]["text"]


def test_the_docs_example_runs_on_the_default_model(litellm: ModuleType, default_url: str) -> None:
    example = docs_example("litellm.completion")
    code = example.replace("http://127.0.0.1:8000", default_url)
    assert code != example, "the example's URL changed: update this test"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/server.md", "exec"), {"__name__": "__docs__"})
    assert printed.getvalue().strip() == "city='Paris' country='France'"  # greedy, held to the schema
