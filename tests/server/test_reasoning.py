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

# The R1 template opened <think> already; the tiny tokenizer writes the tag in seven tokens.
THINKING = "Let me think.</think>\n\nHello world!"
CALLING = (
    'Hmm</think><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}</tool_call>'
)
ARGS: dict[str, Any] = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}


def _client(engine: Any, **settings: Any) -> Iterator[openai.OpenAI]:
    with run_live_server(engine, served_model_name="tiny", **settings) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def _tokens(engine: AsyncEngine, text: str) -> int:
    return len(engine.tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def n_thinking(tiny_engine: AsyncEngine) -> int:
    return _tokens(tiny_engine, THINKING)


@pytest.fixture(scope="module")
def n_reasoning(tiny_engine: AsyncEngine) -> int:
    """THINKING's tokens through the one that completes </think>."""
    return _tokens(tiny_engine, THINKING[: THINKING.index("</think>") + len("</think>")])


@pytest.fixture(scope="module")
def n_calling(tiny_engine: AsyncEngine) -> int:
    return _tokens(tiny_engine, CALLING)


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


def test_chat_reads_the_reasoning_apart(thinking: openai.OpenAI, n_thinking: int) -> None:
    assert thinking.models.retrieve("tiny").reasoning_parser == "deepseek_r1"  # /v1/models says so
    message = _chat(thinking, n_thinking).choices[0].message
    assert message.reasoning_content == "Let me think."
    assert message.content == "\n\nHello world!"


def test_chat_streams_the_reasoning_first(thinking: openai.OpenAI, n_thinking: int) -> None:
    chunks = list(_chat(thinking, n_thinking, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    said = [d for d in deltas if d.content or getattr(d, "reasoning_content", None)]
    kinds = ["content" if d.content else "reasoning" for d in said]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # every reasoning delta before the answer
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me think."
    assert "".join(d.content or "" for d in deltas) == "\n\nHello world!"


def test_cut_off_while_thinking_is_all_reasoning(thinking: openai.OpenAI, n_reasoning: int) -> None:
    message = _chat(thinking, n_reasoning - 1).choices[0].message  # up to the tag's last token
    assert (message.reasoning_content, message.content) == (
        "Let me think.</think"[: len("Let me think.</think")],
        "",
    )
    r = thinking.responses.create(input="Hi", max_output_tokens=n_reasoning - 1, **ARGS)
    assert [item.type for item in r.output] == ["reasoning"]
    assert r.usage.output_tokens_details.reasoning_tokens == n_reasoning - 1  # all of them


def test_tool_calls_are_read_from_the_answer(calling: openai.OpenAI, n_calling: int) -> None:
    message = _chat(calling, n_calling, tools=[WEATHER_TOOL]).choices[0].message
    assert message.reasoning_content == "Hmm"
    [call] = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Oslo",
        "days": 1,
    }
    streamed = list(_chat(calling, n_calling, tools=[WEATHER_TOOL], stream=True))
    pieces = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "Oslo", "days": 1}


def test_logprobs_come_for_every_token_reasoning_included(
    thinking: openai.OpenAI, n_thinking: int, n_reasoning: int
) -> None:
    whole = _chat(thinking, n_thinking, logprobs=True, top_logprobs=1).choices[0]
    assert len(whole.logprobs.content) == n_thinking
    assert (whole.message.reasoning_content, whole.message.content) == ("Let me think.", "\n\nHello world!")
    chunks = [c.choices[0] for c in _chat(thinking, n_thinking, logprobs=True, stream=True) if c.choices]
    assert [lp.logprob for c in chunks for lp in (c.logprobs.content if c.logprobs else ())] == [
        lp.logprob for lp in whole.logprobs.content
    ]
    assert "".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) == "Let me think."
    assert "".join(c.delta.content or "" for c in chunks) == "\n\nHello world!"
    # The Responses API: the answer's tokens only (after the one that closed the reasoning).
    r = thinking.responses.create(
        input="Hi", max_output_tokens=n_thinking, include=["message.output_text.logprobs"], **ARGS
    )
    assert r.usage.output_tokens_details.reasoning_tokens == n_reasoning
    assert len(r.output[1].content[0].logprobs) == n_thinking - n_reasoning


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


def test_responses_make_a_reasoning_item(thinking: openai.OpenAI, n_thinking: int, n_reasoning: int) -> None:
    r = thinking.responses.create(input="Hi", max_output_tokens=n_thinking, **ARGS)
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert [c.text for c in reasoning.content] == ["Let me think."] and reasoning.status == "completed"
    assert message.type == "message" and r.output_text == "\n\nHello world!"
    assert r.usage.output_tokens_details.reasoning_tokens == n_reasoning  # through the closing token
    events = list(thinking.responses.create(input="Hi", max_output_tokens=n_thinking, stream=True, **ARGS))
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


def test_the_reasoning_tokens_do_not_depend_on_how_the_output_came(
    tiny_engine: AsyncEngine, n_thinking: int, n_reasoning: int
) -> None:
    # All of it in one delta, as a reader that fell behind gets it: counted by token all the same.
    for client in _client(ScriptEngine(tiny_engine, THINKING, whole=True), reasoning_parser="deepseek_r1"):
        r = client.responses.create(
            input="Hi", max_output_tokens=n_thinking, include=["message.output_text.logprobs"], **ARGS
        )
    assert r.usage.output_tokens_details.reasoning_tokens == n_reasoning
    assert len(r.output[1].content[0].logprobs) == n_thinking - n_reasoning
    assert r.output[0].content[0].text == "Let me think." and r.output_text == "\n\nHello world!"


def test_without_the_flag_it_is_all_content(tiny_engine: AsyncEngine, n_thinking: int) -> None:
    for client in _client(ScriptEngine(tiny_engine, THINKING)):
        message = _chat(client, n_thinking).choices[0].message
        assert client.models.retrieve("tiny").reasoning_parser is None
        assert message.content == THINKING
        assert getattr(message, "reasoning_content", None) is None


def test_grpc_chat_carries_the_reasoning(tiny_engine: AsyncEngine, n_thinking: int) -> None:
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
                sampling=pb.Sampling(max_tokens=n_thinking, ignore_eos=True, temperature=0),
            )
            choices = [
                c for r in pb_grpc.GenerationStub(channel).Chat(request, timeout=30) for c in r.choices
            ]
    assert "".join(c.reasoning_content for c in choices) == "Let me think."
    assert "".join(c.content for c in choices) == "\n\nHello world!"


def test_kiln_chat_shows_the_thinking_apart_from_the_reply(thinking: openai.OpenAI, n_thinking: int) -> None:
    lines = iter(["Hi", "/exit"])
    out, err = io.StringIO(), io.StringIO()
    history = chat_repl(
        thinking, "tiny", out=out, err=err, read_line=lambda _: next(lines), max_tokens=n_thinking,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert history[-1] == {"role": "assistant", "content": "\n\nHello world!"}  # the answer alone
    assert "Hello world!" in out.getvalue() and "Let me think." not in out.getvalue()
    assert err.getvalue().startswith("Let me think.\n")  # dimmed on a terminal, then the stats line


def test_responses_read_calls_after_the_reasoning(calling: openai.OpenAI, n_calling: int) -> None:
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    r = calling.responses.create(input=ASK, tools=[tool], max_output_tokens=n_calling, **ARGS)
    assert [item.type for item in r.output] == ["reasoning", "function_call"]
    assert r.output[0].content[0].text == "Hmm"
    assert json.loads(r.output[1].arguments) == {"city": "Oslo", "days": 1}
