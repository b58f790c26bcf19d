"""kiln.serve.text_chunks: a stream's text-delta chunks from a template are the models' own JSON."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
)
from kiln.serve.text_chunks import TextChunks


def completion(fingerprint: str | None = None, model: str = "tiny") -> object:
    def render(index: int, text: str) -> str:
        return CompletionResponse(
            id="cmpl-1", created=1700000000, model=model, system_fingerprint=fingerprint,
            choices=[CompletionChoice(index=index, text=text)],
        ).model_dump_json(exclude={"usage"})  # fmt: skip

    return render


def chat(fingerprint: str | None = None, usage: bool = False) -> object:
    def render(index: int, text: str) -> str:
        return ChatCompletionChunk(
            id="chatcmpl-1", created=1700000000, model="tiny", system_fingerprint=fingerprint,
            choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))],
        ).model_dump_json(exclude=None if usage else {"usage"})  # fmt: skip

    return render


RENDERS = [completion(), completion("tiny/v2"), chat(), chat("tiny/v2", usage=True)]


@pytest.mark.parametrize("render", RENDERS, ids=["completion", "completion-v2", "chat", "chat-v2-usage"])
@given(index=st.integers(0, 10_000), text=st.text())
def test_a_filled_in_chunk_is_the_models_json(render, index: int, text: str) -> None:
    assert TextChunks(render)(index, text) == render(index, text)


@pytest.mark.parametrize(
    "text", ['"quoted" \\ back', "line\nbreak\ttab\r\x00\x1f\x7f", "\u2028\u2029\x85", "naïve 日本 🔥", ""]
)
def test_escapes_match_pydantics(text: str) -> None:
    render = chat()
    assert TextChunks(render)(3, text) == render(3, text)


def test_the_template_is_rendered_once_per_key() -> None:
    calls: list[tuple[int, str]] = []
    fingerprints = {None: completion(), "tiny/v2": completion("tiny/v2")}
    key = [None]

    def render(index: int, text: str) -> str:
        calls.append((index, text))
        return fingerprints[key[0]](index, text)

    chunks = TextChunks(render)
    assert chunks(0, "a", key[0]) == fingerprints[None](0, "a")
    assert chunks(0, "b", key[0]) == fingerprints[None](0, "b")
    assert len(calls) == 1  # the probe only
    key[0] = "tiny/v2"  # the first output named the version that answers
    assert chunks(1, "c", key[0]) == fingerprints["tiny/v2"](1, "c")
    assert len(calls) == 2


def test_a_probe_that_does_not_split_falls_back_to_the_model() -> None:
    render = completion(model="918273645")  # the index marker in another field
    calls: list[str] = []

    def counted(index: int, text: str) -> str:
        calls.append(text)
        return render(index, text)

    chunks = TextChunks(counted)
    assert chunks(2, "x") == render(2, "x")
    assert chunks(2, "y") == render(2, "y")
    assert calls[1:] == ["x", "y"]  # after the probe, each chunk through the model
