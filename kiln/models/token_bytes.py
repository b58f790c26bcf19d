"""`TokenBytes`: the bytes a token stands for, what OpenAI's logprob `bytes` field carries.

A token may be part of a character: a byte-level BPE token of one byte of an emoji, a SentencePiece
byte-fallback token `<0xF0>`. Decoded alone it is U+FFFD, whose UTF-8 is not the token's; the `bytes`
field exists so a client can join the tokens' bytes back into the text. Rules, by the tokenizer's decoder:
- ByteLevel (GPT-2's scheme: SmolLM2, Llama 3): each character of the token's string is one byte, through
  GPT-2's byte-to-character table (transformers' `bytes_to_unicode`);
- ByteFallback (SentencePiece: Llama 2, Mistral): `<0xNN>` is the byte NN; any other token is its string
  after the decoder's Replace steps (`▁` -> space), in UTF-8;
- added tokens (specials among them) are their content in UTF-8, as they are in text;
- any other decoder: the token decoded alone, in UTF-8.
A token's bytes keep the space a SentencePiece word starts with, which decoding the token alone strips.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """Token id -> bytes for one Rust `tokenizers.Tokenizer`; `added` maps added tokens' ids to their
    content. Reads the decoder's description once; each answer is computed on demand and kept."""

    def __init__(self, rust: Any, added: dict[int, str]) -> None:
        self._rust = rust
        self._added = added
        self._cache: dict[int, bytes] = {}
        decoder = json.loads(rust.to_str()).get("decoder") or {}
        steps = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {step.get("type") for step in steps}
        self._byte_of: dict[str, int] | None = None
        if "ByteLevel" in kinds:
            from transformers.convert_slow_tokenizer import bytes_to_unicode  # deferred: heavy, rarely needed

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._fallback = "ByteFallback" in kinds
        self._replace = [
            (step["pattern"]["String"], step["content"])
            for step in steps
            if step.get("type") == "Replace" and "String" in (step.get("pattern") or {})
        ]

    def __call__(self, token_id: int) -> bytes:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._compute(token_id)
        return found

    def _compute(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.encode()
        token = self._rust.id_to_token(token_id)
        if token is None:  # an id past the vocabulary (a padded embedding row): it decodes to nothing
            return b""
        if self._byte_of is not None and all(char in self._byte_of for char in token):
            return bytes(self._byte_of[char] for char in token)
        if self._fallback:
            byte = _BYTE_TOKEN.fullmatch(token)
            if byte is not None:
                return bytes([int(byte.group(1), 16)])
            for pattern, content in self._replace:
                token = token.replace(pattern, content)
            return token.encode()
        return self._rust.decode([token_id], skip_special_tokens=False).encode()
