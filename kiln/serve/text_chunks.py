"""`TextChunks`: a stream's text-delta chunks as their pydantic model writes them, filled in per token.

A streamed response sends a chunk per token and choice, and building and serializing its two pydantic
models for each was a fifth of the server thread's time per streamed request (docs/results/2026-12-06-cpu).
Between two such chunks only the choice's index and its text change.

Rules:
- The model renders one probe chunk, index and text set to markers, and its JSON is split at them: a
  filled-in chunk is byte for byte what the model makes of the same chunk (a test checks this over
  arbitrary text). The text goes through `json`'s own string encoder without ASCII escapes, which escapes
  what pydantic's serializer escapes (the quote, the backslash, control characters) the same way.
- A chunk with anything else set (logprobs, a finish reason, tool calls, the role) goes through the model.
- `key` is whatever else the chunk depends on that may change mid-stream (the system fingerprint, known
  from the first output): a new key renders the probe again.
- If the probe does not split cleanly (a marker also in another field), every chunk goes through the model;
  so does every chunk of a stream whose chunks change otherwise (`fixed=False`: a running usage in each).
"""

from __future__ import annotations

import json
from collections.abc import Callable

_INDEX = 918273645
_TEXT = "kiln-text-chunk-marker"
_encode_text = json.JSONEncoder(ensure_ascii=False).encode  # a str takes the C string encoder directly
_NO_KEY = object()


class TextChunks:
    """`chunks(index, text, key)` is `render(index, text)`, from a template once rendered."""

    __slots__ = ("_fixed", "_key", "_parts", "_render")

    def __init__(self, render: Callable[[int, str], str], fixed: bool = True) -> None:
        self._render = render
        self._key: object = _NO_KEY
        self._parts: tuple[str, str, str] | None = None
        self._fixed = fixed

    def __call__(self, index: int, text: str, key: object = None) -> str:
        if not self._fixed:
            return self._render(index, text)
        if key != self._key:
            self._key, self._parts = key, _split(self._render(_INDEX, _TEXT))
        if self._parts is None:
            return self._render(index, text)
        head, middle, tail = self._parts
        return f"{head}{index}{middle}{_encode_text(text)}{tail}"


def _split(probe: str) -> tuple[str, str, str] | None:
    index, text = str(_INDEX), _encode_text(_TEXT)
    if probe.count(index) != 1 or probe.count(text) != 1 or probe.index(index) > probe.index(text):
        return None
    head, rest = probe.split(index)
    middle, tail = rest.split(text)
    return head, middle, tail
