"""Tool calling through the OpenAI API: tools rendered for the model, calls read out of its output,
`required` and a named function enforced by the grammar (so even a random model makes a valid call),
streamed calls accumulated by the official client, a history with tool results, clear 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_harness import LiveServer, run_live_server
from weather_tool import ASK, WEATHER_TOOL

from kiln.clients.thread import AsyncEngine
from kiln.serve.chat_tools import template_messages
from kiln.serve.protocol import ChatMessage

TOOLS = [
    WEATHER_TOOL,
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture(scope="module")
def live(tiny_engine: AsyncEngine):
    with run_live_server(tiny_engine, served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")


def _valid(call) -> None:
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_") and call.type == "function"


def test_required_makes_valid_calls(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        seed=1,
    ).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _valid(call)


def test_a_named_function_streamed_and_accumulated_by_the_sdk(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.beta.chat.completions.stream(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice=named,
        parallel_tool_calls=False,
        max_tokens=200,
        seed=2,
    ) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and final.choices[0].finish_reason == "tool_calls"
    _valid(call)
    # The same request whole gives the same call (seeded), so stream and non-stream agree.
    whole = (
        client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=TOOLS,
            tool_choice=named,
            parallel_tool_calls=False,
            max_tokens=200,
            seed=2,
        )
        .choices[0]
        .message.tool_calls[0]
    )
    assert (whole.function.name, whole.function.arguments) == (call.function.name, call.function.arguments)


def test_auto_reads_the_output_and_a_history_with_tool_results_runs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=8, seed=1)
    assert reply.choices[0].message.tool_calls is None  # a random model's text holds no call
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    after = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, seed=1)
    assert after.choices[0].finish_reason in {"length", "stop"}


def test_the_models_tool_call_format_is_listed(client: openai.OpenAI) -> None:
    assert client.models.list().data[0].tool_call_format == "hermes"  # the tiny template renders no tools


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "logprobs": True}, "logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(live: LiveServer, patch: dict, param: str) -> None:
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny", "messages": ASK, **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_templates_get_tools_as_they_expect() -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                ],
            }
        ),
        ChatMessage(role="tool", content="42", tool_call_id="c1"),
    ]
    native = template_messages(messages, None, native=True)
    assert native[1]["tool_calls"][0]["function"] == {
        "name": "f",
        "arguments": {"x": 1},
    }  # an object for `tojson`
    assert native[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    fallback = template_messages(messages, None, native=False)
    assert fallback[1]["content"] == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert fallback[2] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
