"""The official `openai` client against a real server on the tiny native engine."""

from __future__ import annotations

import openai
import pytest
from server_harness import LiveServer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_non_stream_counts_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_chat_stream_matches_non_stream_greedy(client: openai.OpenAI) -> None:
    args = dict(model="tiny", messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_chat_stream_include_usage_adds_a_final_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_completion_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n2_returns_one_choice_per_index(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, n=2, seed=7, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, n=2, stream=True, extra_body={"ignore_eos": True}
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_ends_the_completion_before_it(client: openai.OpenAI) -> None:
    args = dict(model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0)
    full = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    # A stop string from the middle of the greedy output: the same run must end right before it.
    candidates = [full[i : i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert candidates, f"greedy output too short to pick a stop string from: {full!r}"
    stop = candidates[0]
    r = client.completions.create(**args, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(**args, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[: full.index(stop)]


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    # Each token's own bytes (a part of a character where its text alone is U+FFFD): joined, the text
    # (and a character the reply ended in the middle of, which the text leaves out).
    decoded = bytes(b for entry in content for b in entry.bytes).decode(errors="replace")
    text = r.choices[0].message.content
    assert decoded.startswith(text) and set(decoded[len(text) :]) <= {"\ufffd"}
    for entry in content:
        assert entry.logprob <= 0
        assert "\ufffd" in entry.token or entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert entry.logprob <= ranked[0] + 1e-6


def test_completion_logprobs_shape_and_offsets(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, logprobs=2, temperature=0, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    # greedy: the chosen token is the best-ranked one
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token_lp == pytest.approx(max(top.values()))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_completion_batch_prompts_echo_and_token_ids(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt=["Hello", "World"], n=2, max_tokens=3, echo=True, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0].startswith("Hello") and by_index[1].startswith("Hello")
    assert by_index[2].startswith("World") and by_index[3].startswith("World")
    assert r.usage.completion_tokens == 12
    ids = client.completions.create(
        model="tiny", prompt=[5, 6, 7, 8], max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert ids.usage.prompt_tokens == 4


def test_completion_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(
    client: openai.OpenAI, endpoint: str
) -> None:
    common = {"model": "tiny", "max_tokens": 5, "n": 2, "stream": True, "extra_body": {"ignore_eos": True}}
    options = {"include_usage": True, "continuous_usage_stats": True}
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(messages=CHAT, stream_options=options, **common))
    else:
        chunks = list(client.completions.create(prompt=[5, 6, 7], stream_options=options, **common))
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 10
    assert all(c.usage is not None and c.usage.prompt_tokens == final.usage.prompt_tokens for c in chunks)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    seen = [c.usage.completion_tokens for c in chunks[:-1]]
    assert seen == sorted(seen) and seen[-1] == 10  # counting up to the whole
    assert seen[0] == 0 if endpoint == "chat" else seen[0] <= 2  # chat's role chunks come before any token
    with pytest.raises(openai.BadRequestError) as refused:  # per chunk only with the final usage
        client.completions.create(prompt=[5], stream_options={"continuous_usage_stats": True}, **common)
    assert refused.value.body["param"] == "stream_options.continuous_usage_stats"


def test_truncate_prompt_tokens_keeps_the_prompts_end(client: openai.OpenAI, server: LiveServer) -> None:
    ids = list(range(5, 45))
    greedy = {"model": "tiny", "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    cut = client.completions.create(
        prompt=ids, echo=True, **greedy | {"extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 8}}
    )
    tail = client.completions.create(prompt=ids[-8:], echo=True, **greedy)
    assert cut.usage.prompt_tokens == 8 and cut.choices[0].text == tail.choices[0].text
    chat = client.chat.completions.create(
        messages=CHAT, **greedy | {"extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 5}}
    )
    rendered = server.engine.tokenizer.apply_chat_template(CHAT)
    assert chat.usage.prompt_tokens == 5 < len(rendered)
    same = client.completions.create(prompt=rendered[-5:], **greedy)
    assert chat.choices[0].message.content == same.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(prompt=ids, **greedy | {"extra_body": {"truncate_prompt_tokens": 0}})
    assert refused.value.body["param"] == "truncate_prompt_tokens"
