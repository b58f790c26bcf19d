"""Incremental detokenizer: deltas add up to the full decode, split characters are held, windows stay short."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.models.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from kiln.models.tokenizer import Tokenizer, has_primed_decode_stream

MULTIBYTE = "Emoji 😀🚀👍 and CJK 今天天气很好 世界, accents café, family 👨‍👩‍👧‍👦 done."
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True, params=["stream", "window"])
def decoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: through the tokenizer's Rust stream decoder, and through the detokenizer's
    own windows (what a tokenizer without a stream decoder gets)."""
    if request.param == "window":
        monkeypatch.setattr(Tokenizer, "decode_stream", lambda self, context, skip_special_tokens=True: None)
    elif not has_primed_decode_stream():
        pytest.skip("this tokenizers has no DecodeStream that starts from context ids")
    return request.param


@pytest.fixture(scope="module")
def tiny(tiny_gqa_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_gqa_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer(smollm2_gguf)


def stream(tok: Tokenizer, prompt: list[int], output: list[int], chunk: int = 1, **kw) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [detok.add(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    assert "".join(deltas) == detok.text
    return deltas


def assert_matches_full_decode(tok: Tokenizer, output: list[int], text: str, skip: bool) -> None:
    full = tok.decode(output, skip_special_tokens=skip)
    assert full.startswith(text)
    rest = full[len(text) :]
    assert rest == "" or rest.endswith(REPLACEMENT_CHAR)  # only a final incomplete character is held


@SETTINGS
@given(data=st.data(), skip=st.booleans(), chunk=st.integers(1, 4))
def test_random_ids_deltas_equal_full_decode_byte_level(tiny: Tokenizer, data, skip: bool, chunk: int):
    ids = st.integers(0, tiny.vocab_size - 1)
    prompt = data.draw(st.lists(ids, max_size=8))
    output = data.draw(st.lists(ids, max_size=40))
    deltas = stream(tiny, prompt, output, chunk, skip_special_tokens=skip)
    assert_matches_full_decode(tiny, output, "".join(deltas), skip)


@SETTINGS
@given(data=st.data())
def test_random_ids_deltas_equal_full_decode_smollm2(smollm2: Tokenizer, data):
    ids = st.integers(0, smollm2.vocab_size - 1)
    output = data.draw(st.lists(ids, max_size=30))
    deltas = stream(smollm2, data.draw(st.lists(ids, max_size=5)), output)
    assert_matches_full_decode(smollm2, output, "".join(deltas), True)


@pytest.mark.parametrize("name", ["tiny", "smollm2", "llama_style"])
def test_split_characters_never_yield_replacement_mid_stream(name: str, request: pytest.FixtureRequest):
    tok: Tokenizer = request.getfixturevalue(name)
    output = tok.encode(MULTIBYTE, add_special_tokens=False)
    # The test means something only if some token really ends inside a character.
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in output)
    deltas = stream(tok, tok.encode("Say hi"), output)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    text = "".join(deltas)
    assert text.strip() == MULTIBYTE
    if name != "llama_style":
        assert text == tok.decode(output)


def test_sentencepiece_keeps_the_space_the_prompt_context_gives(llama_style: Tokenizer):
    prompt = llama_style.encode("Say hi to the")
    output = llama_style.encode(" world again", add_special_tokens=False)
    assert llama_style.convert_ids_to_tokens(output)[0] == "▁world"
    # Decoded alone, the first word loses its "▁" space; after the prompt it keeps it.
    assert llama_style.decode(output) == "world again"
    deltas = stream(llama_style, prompt, output)
    assert "".join(deltas) == " world again"
    assert deltas[0] == " world"
    assert "".join(stream(llama_style, [], output)) == "world again"  # no prompt: plain decode


@SETTINGS
@given(data=st.data())
def test_random_sentencepiece_streams_match_windowed_decode(llama_style: Tokenizer, data):
    # Byte-fallback tokens appear only as valid UTF-8 (encoded text): transformers' ByteFallback decoder
    # turns *every* byte of an invalid run into U+FFFD, so invalid bytes are not prefix-stable there.
    words = [
        i
        for i in range(llama_style.vocab_size)
        if not llama_style.convert_ids_to_tokens([i])[0].startswith("<")
    ]
    segment = st.one_of(
        st.lists(st.sampled_from(words), min_size=1, max_size=3),
        st.text(alphabet="ab 😀世é", min_size=1, max_size=4).map(lambda t: llama_style.encode(t)),
    )
    prompt = [i for seg in data.draw(st.lists(segment, max_size=3)) for i in seg]
    output = [i for seg in data.draw(st.lists(segment, max_size=8)) for i in seg]
    text = "".join(stream(llama_style, prompt, output, data.draw(st.integers(1, 3))))
    # The prompt is valid text, so a short window of it gives the same text as the whole prompt.
    assert text == llama_style.decode(prompt + output)[len(llama_style.decode(prompt)) :]


@SETTINGS
@given(data=st.data())
def test_random_byte_fallback_ids_never_fail(llama_style: Tokenizer, data):
    # Invalid byte runs included: where DecodeStream refuses a window, the detokenizer restarts it, so no
    # step raises and the deltas add up to the text (`stream` checks); the text itself may differ from a
    # full decode, whose ByteFallback replaces a whole invalid run (see the module docstring).
    ids = st.integers(0, llama_style.vocab_size - 1)
    output = data.draw(st.lists(ids, max_size=30))
    stream(llama_style, data.draw(st.lists(ids, max_size=5)), output, data.draw(st.integers(1, 3)))


def test_skip_special_tokens(tiny: Tokenizer):
    output = [*tiny.encode("Hi"), 2, *tiny.encode(" there"), 1]
    assert "".join(stream(tiny, [], output)) == "Hi there"
    assert "".join(stream(tiny, [], output, skip_special_tokens=False)) == "Hi<|im_end|> there<|im_start|>"


def test_invalid_bytes_are_released_once_valid_text_follows(tiny: Tokenizer):
    lone_continuation = next(i for i in range(3, tiny.vocab_size) if tiny.decode([i]) == REPLACEMENT_CHAR)
    output = [lone_continuation, *tiny.encode("ok")]
    deltas = stream(tiny, [], output)
    assert deltas[0] == ""  # might still complete a character
    assert "".join(deltas) == REPLACEMENT_CHAR + "ok" == tiny.decode(output)


def test_decode_window_stays_short(tiny: Tokenizer):
    lengths: list[int] = []

    class Recording:  # a tokenizer without a stream decoder: the detokenizer keeps its own windows
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tiny.decode(ids, skip_special_tokens)

        def decode_stream(self, context, skip_special_tokens=True):
            return None

    recording = Recording()
    output = tiny.encode("The quick brown fox jumps over the lazy dog. " * 20)
    text = "".join(stream(recording, tiny.encode("prompt " * 50), output))
    assert text == tiny.decode(output)
    assert max(lengths) <= 8


@pytest.mark.parametrize("failing_starts", [1, 2])
def test_a_stream_that_cannot_extend_its_window_restarts(tiny: Tokenizer, decoding: str, failing_starts: int):
    if decoding == "window":
        pytest.skip("the stream decoder's path")
    starts: list[list[int]] = []
    real = Tokenizer.decode_stream

    class Failing:  # a stream that raises at its third step, as DecodeStream does around invalid byte runs
        def __init__(self, inner, fail_at):
            self.inner, self.steps, self.fail_at = inner, 0, fail_at

        def step(self, ids):
            self.steps += 1
            if self.steps == self.fail_at:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(ids)

    def decode_stream(self, context, skip_special_tokens=True):
        starts.append(list(context))
        stream = real(self, context, skip_special_tokens)
        if len(starts) > failing_starts:
            return stream
        return Failing(stream, 3 if len(starts) == 1 else 1)  # a restart fails at once

    prompt = tiny.encode("Say hi to")
    output = tiny.encode(" the world, and again.", add_special_tokens=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tokenizer, "decode_stream", decode_stream)
        text = "".join(stream(tiny, prompt, output))
    # Restarted from the ids before the third output token; if that fails too, on in the Python window.
    assert len(starts) == 2
    assert starts[1] and starts[1] == (prompt + output[:2])[-len(starts[1]) :]
    assert text == tiny.decode(output)
