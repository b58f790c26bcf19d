"""Token bytes (OpenAI's logprob `bytes`): joined over a text's tokens they are the text's UTF-8, for a
byte-level BPE tokenizer and a SentencePiece one with byte fallback, even where tokens split characters."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.models.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "Emoji 😀🚀👍 and CJK 今天天气很好, accents café, family 👨‍👩‍👧‍👦.",
    " leading space and\nnew lines\t\ttabs",
]


@pytest.mark.parametrize("checkpoint", ["tiny_gqa_dir", "smollm2_gguf"])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_join_into_the_text(
    request: pytest.FixtureRequest, checkpoint: str, text: str
) -> None:
    tok = Tokenizer(request.getfixturevalue(checkpoint))
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert not split or all(tok.token_bytes(i) != "\ufffd".encode() for i in split)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_tokens_join_into_the_text(llama_style: Tokenizer, text: str) -> None:
    ids = llama_style.encode(text, add_special_tokens=False)
    assert any(llama_style.convert_ids_to_tokens([i])[0].startswith("<0x") for i in ids[1:]) or text.isascii()
    # The tokenizer puts a "▁" before a text that starts with no space, which decoding strips: its bytes
    # keep that space.
    expected = text.encode() if text.startswith(" ") else b" " + text.encode()
    assert b"".join(llama_style.token_bytes(i) for i in ids) == expected


def test_special_tokens_are_their_text(smollm2_gguf: Path) -> None:
    smollm2 = Tokenizer(smollm2_gguf)
    for token_id in smollm2.all_special_ids:
        assert smollm2.token_bytes(token_id) == smollm2.decode([token_id], skip_special_tokens=False).encode()
    assert smollm2.token_bytes(smollm2.eos_token_ids[0]) == b"<|im_end|>"
