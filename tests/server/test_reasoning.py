"""`--reasoning-parser deepseek_r1`: a reasoning model's thinking read apart from its answer, in chat
(`reasoning_content`, whole and streamed, tool calls read from the answer) and in the Responses API
(a reasoning item before the message, its own stream events, `reasoning_tokens`); a grammar holds the
answer only (the engine is asked to leave the text to `</think>` free); logprobs come for every token
in chat, for the answer's in the Responses API; without the flag the output is all content. The
outputs are scripted token by token over the tiny engine (`ScriptEngine`)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fakes import RecordingEngine, ScriptEngine
from server_harness import run_live_server
from weather_tool import ASK, WEATHER_TOOL

from kiln.clients.thread import AsyncEngine
from kiln.serve.terminal import chat_repl

# The tag split across tokens, as a tokenizer may split it; the R1 template opened <think> already.
THINKING = ["Let", " me", " think", ".</th", "ink>", "\n\nHello", " world", "!"]
CALLING = ["Hmm", "</think>", "<tool_call>", '{"name": "get_weather", ', '"arguments": {"city": "Oslo", "days": 1}}', "</tool_call>"]  # fmt: skip
ARGS: dict[str, Any] = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}


def _client(engine: Any, **settings: Any) -> Iterator[openai.OpenAI]:
    with run_live_server(engine, served_model_name="tiny", **settings) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinking(tiny_engine: AsyncEngine) -> Iterator[openai.OpenAI]:
    yield from _client(ScriptEngine(tiny_engine, THINKING), reasoning_parser="deepseek_r1")


@pytest.fixture(scope="module")
def calling(tiny_engine: AsyncEngine) -> Iterator[openai.OpenAI]:
    engine = ScriptEngine(tiny_engine, CALLING)
    yield from _client(engine, reasoning_parser="deepseek_r1", tool_call_parser="hermes")


def _chat(client: openai.OpenAI, tokens: int, **kw: Any) -> Any:
    return client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], max_tokens=tokens, **ARGS, **kw
    )


def test_chat_reads_the_reasoning_apart(thinking: openai.OpenAI) -> None:
    assert thinking.models.retrieve("tiny").reasoning_parser == "deepseek_r1"  # /v1/models says so
    message = _chat(thinking, len(THINKING)).choices[0].message
    assert message.reasoning_content == "Let me think."
    assert message.content == "\n\nHello world!"


def test_chat_streams_the_reasoning_first(thinking: openai.OpenAI) -> None:
    chunks = list(_chat(thinking, len(THINKING), stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    said = [d for d in deltas if d.content or getattr(d, "reasoning_content", None)]
    kinds = ["content" if d.content else "reasoning" for d in said]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # every reasoning delta before the answer
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me think."
    assert "".join(d.content or "" for d in deltas) == "\n\nHello world!"


def test_cut_off_while_thinking_is_all_reasoning(thinking: openai.OpenAI) -> None:
    message = _chat(thinking, 3).choices[0].message
    assert (message.reasoning_content, message.content) == ("Let me think", "")


def test_tool_calls_are_read_from_the_answer(calling: openai.OpenAI) -> None:
    message = _chat(calling, len(CALLING), tools=[WEATHER_TOOL]).choices[0].message
    assert message.reasoning_content == "Hmm"
    [call] = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Oslo",
        "days": 1,
    }
    streamed = list(_chat(calling, len(CALLING), tools=[WEATHER_TOOL], stream=True))
    pieces = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Oslo", "days": 1}


def test_logprobs_come_for_every_token_reasoning_included(thinking: openai.OpenAI) -> None:
    whole = _chat(thinking, len(THINKING), logprobs=True, top_logprobs=1).choices[0]
    assert len(whole.logprobs.content) == len(THINKING)
    assert (whole.message.reasoning_content, whole.message.content) == ("Let me think.", "\n\nHello world!")
    chunks = [c.choices[0] for c in _chat(thinking, len(THINKING), logprobs=True, stream=True) if c.choices]
    assert [lp.logprob for c in chunks for lp in (c.logprobs.content if c.logprobs else ())] == [
        lp.logprob for lp in whole.logprobs.content
    ]
    assert "".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) == "Let me think."
    assert "".join(c.delta.content or "" for c in chunks) == "\n\nHello world!"
    # The Responses API: the answer's tokens only (after the one that closed the reasoning).
    r = thinking.responses.create(
        input="Hi", max_output_tokens=len(THINKING), include=["message.output_text.logprobs"], **ARGS
    )
    assert len(r.output[1].content[0].logprobs) == 3 and r.usage.output_tokens_details.reasoning_tokens == 5


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_object"}},
        {"tools": [WEATHER_TOOL], "tool_choice": "required"},
        {"extra_body": {"ignore_eos": True, "structured_outputs": {"regex": "[ab]{3}"}}},
    ],
)
def test_a_grammar_holds_the_answer_after_the_reasoning(
    tiny_engine: AsyncEngine, fields: dict[str, Any]
) -> None:
    # What the engine does with `after` is tests/model/test_reasoning_grammar.py's; here: the server asks it.
    engine = RecordingEngine(tiny_engine)
    for client in _client(engine, reasoning_parser="deepseek_r1"):
        client.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **{**ARGS, **fields}
        )
    [call] = engine.calls
    assert call["params"].structured is not None and call["params"].structured.after == "</think>"


def test_responses_make_a_reasoning_item(thinking: openai.OpenAI) -> None:
    r = thinking.responses.create(input="Hi", max_output_tokens=len(THINKING), **ARGS)
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert [c.text for c in reasoning.content] == ["Let me think."] and reasoning.status == "completed"
    assert message.type == "message" and r.output_text == "\n\nHello world!"
    assert r.usage.output_tokens_details.reasoning_tokens == 5  # through the token that closed it
    events = list(thinking.responses.create(input="Hi", max_output_tokens=len(THINKING), stream=True, **ARGS))
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == "Let me think." == events[-1].response.output[0].content[0].text
    # Reasoning sent back is taken and left out of the prompt.
    back = [
        {"role": "user", "content": "Hi"},
        reasoning.model_dump(exclude_none=True),
        {"role": "user", "content": "Again"},
    ]
    plain = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]
    with_it = thinking.responses.create(input=back, max_output_tokens=1, **ARGS)
    without = thinking.responses.create(input=plain, max_output_tokens=1, **ARGS)
    assert with_it.usage.input_tokens == without.usage.input_tokens


def test_without_the_flag_it_is_all_content(tiny_engine: AsyncEngine) -> None:
    for client in _client(ScriptEngine(tiny_engine, THINKING)):
        message = _chat(client, len(THINKING)).choices[0].message
        assert client.models.retrieve("tiny").reasoning_parser is None
        assert message.content == "".join(THINKING)
        assert getattr(message, "reasoning_content", None) is None


def test_grpc_chat_carries_the_reasoning(tiny_engine: AsyncEngine) -> None:
    import grpc

    from kiln.serve.grpc import kiln_pb2 as pb
    from kiln.serve.grpc import kiln_pb2_grpc as pb_grpc

    engine = ScriptEngine(tiny_engine, THINKING)
    with run_live_server(
        engine, served_model_name="tiny", reasoning_parser="deepseek_r1", grpc_port=0
    ) as live:
        port = live.server.config.app.state.kiln_grpc.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content="Hi")],
                sampling=pb.Sampling(max_tokens=len(THINKING), ignore_eos=True, temperature=0),
            )
            choices = [
                c for r in pb_grpc.GenerationStub(channel).Chat(request, timeout=30) for c in r.choices
            ]
    assert "".join(c.reasoning_content for c in choices) == "Let me think."
    assert "".join(c.content for c in choices) == "\n\nHello world!"


def test_kiln_chat_shows_the_thinking_apart_from_the_reply(thinking: openai.OpenAI) -> None:
    lines = iter(["Hi", "/exit"])
    out, err = io.StringIO(), io.StringIO()
    history = chat_repl(
        thinking, "tiny", out=out, err=err, read_line=lambda _: next(lines), max_tokens=len(THINKING),
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert history[-1] == {"role": "assistant", "content": "\n\nHello world!"}  # the answer alone
    assert "Hello world!" in out.getvalue() and "Let me think." not in out.getvalue()
    assert err.getvalue().startswith("Let me think.\n")  # dimmed on a terminal, then the stats line


def test_responses_read_calls_after_the_reasoning(calling: openai.OpenAI) -> None:
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    r = calling.responses.create(input=ASK, tools=[tool], max_output_tokens=len(CALLING), **ARGS)
    assert [item.type for item in r.output] == ["reasoning", "function_call"]
    assert r.output[0].content[0].text == "Hmm"
    assert json.loads(r.output[1].arguments) == {"city": "Oslo", "days": 1}
