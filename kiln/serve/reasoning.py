"""Reasoning in a model's output, read apart from its answer (`--reasoning-parser`), as vLLM's reasoning
parsers read it: chat's `reasoning_content`, the Responses API's reasoning item.

Rules of `deepseek_r1` (DeepSeek-R1 and its Llama distills, whose chat template opens `<think>` in the
generation prompt, and every model that thinks in `<think>` ... `</think>`):
- The output is reasoning up to `</think>`, the answer after it; an output that opens with `<think>`
  (after whitespace) has the tag dropped. With no `</think>`, all of it is reasoning (cut off while
  thinking).
- Streamed, a piece that may be the start of a tag is held back until the next one says; the text
  given out joins to the whole output's reading.
- A grammar (response_format, structured outputs, a forced tool call) holds the answer only: the engine
  leaves the text up to the first `</think>` free (`StructuredOutput.after`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.serve.tool_parsers import partial_suffix

REASONING_END = "</think>"  # a structured output holds the answer from here on (StructuredOutput.after)
_OPEN, _CLOSE = "<think>", REASONING_END


@dataclass(frozen=True, slots=True)
class Piece:
    reasoning: bool  # reasoning, else answer
    text: str


class ReasoningParser:
    """Streaming reader of one output (module rules): `feed` each new piece of text, then `finish`."""

    def __init__(self) -> None:
        self._opening = True  # nothing but whitespace yet: a `<think>` here is dropped
        self._thinking = True
        self._held = ""

    @property
    def thinking(self) -> bool:
        """Still in the reasoning (no `</think>` read yet)."""
        return self._thinking

    def feed(self, text: str) -> list[Piece]:
        buf = self._held + text
        self._held = ""
        out: list[Piece] = []
        if self._opening:
            stripped = buf.lstrip()
            if _OPEN.startswith(stripped) and stripped != _OPEN:  # maybe the tag, not yet whole
                self._held = buf
                return out
            self._opening = False
            if stripped.startswith(_OPEN):
                buf = stripped[len(_OPEN) :]
        if self._thinking:
            end = buf.find(_CLOSE)
            if end < 0:
                keep = partial_suffix(buf, _CLOSE)
                self._held = buf[len(buf) - keep :] if keep else ""
                _add(out, True, buf[: len(buf) - keep])
                return out
            _add(out, True, buf[:end])
            self._thinking = False
            buf = buf[end + len(_CLOSE) :]
        _add(out, False, buf)
        return out

    def finish(self) -> list[Piece]:
        """The output ended: what was held back is the text it was taken for."""
        out: list[Piece] = []
        held, self._held = self._held, ""
        if self._opening and held.strip() == "":
            return out
        _add(out, self._thinking, held)
        return out

    @classmethod
    def split(cls, text: str) -> tuple[str | None, str]:
        """A whole output's reasoning (None when there is none) and answer."""
        parser = cls()
        pieces = [*parser.feed(text), *parser.finish()]
        reasoning = "".join(p.text for p in pieces if p.reasoning)
        answer = "".join(p.text for p in pieces if not p.reasoning)
        return (reasoning or None), answer


def _add(out: list[Piece], reasoning: bool, text: str) -> None:
    if text:
        out.append(Piece(reasoning, text))
