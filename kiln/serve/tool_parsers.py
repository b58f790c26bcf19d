"""Tool call formats: a model's output parsed into content and OpenAI `tool_calls`, whole or streamed.

Formats (vLLM's `--tool-call-parser` names; `detect_parser` picks one from the chat template):
- "hermes" (Hermes, Qwen 2.5/3): free text, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>` blocks. Text outside the blocks is content; whitespace next to a block is dropped; a
  block that holds no call is content, tags included. A missing close tag is forgiven.
- "llama3_json" (Llama 3.1-3.3 JSON tool calls): the whole message is `{"name": ..., "parameters": {...}}`
  ("arguments" also read), optionally after `<|python_tag|>`, several calls separated by `;`. A message
  that does not start (after whitespace) with `{` or `<|python_tag|>` is content, and so is one whose
  first object is no call; text after the calls is content.

Rules:
- One state machine serves both modes: `parse(text)` is `feed(text)` + `finish()`, collected. Streaming
  and non-streaming results are therefore the same, however the text is split.
- Nothing that may still turn out to be part of a call is emitted as content: a partial tag, the
  whitespace before it, and a call object until it commits (kiln.serve.tool_calls) are held back.
- Each call's first delta has its id and name (arguments ""); the following ones carry only argument
  fragments, which add up to the call's arguments.
- The parsers read text: where a format's marker is a special token (`<tool_call>` in Hermes 2 Pro) the
  output must be detokenized with special tokens kept. `<|python_tag|>` is optional to llama3_json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from kiln.serve.tool_calls import (
    DONE,
    FAILED,
    WS,
    CallReader,
    Delta,
    DeltaBuffer,
    ParsedOutput,
    ToolCallDelta,
    collect,
    new_call_id,
)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """Streaming parser of one output: `feed` each new piece of text, then `finish` once."""

    name: ClassVar[str]

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self._new_id = id_factory
        self._index = 0  # of the next call
        self._reader: CallReader | None = None
        self._header_sent = False

    def feed(self, text: str) -> list[Delta]:
        out = DeltaBuffer()
        self._push(text, out)
        return out.items

    def finish(self) -> list[Delta]:
        out = DeltaBuffer()
        self._finish(out)
        return out.items

    @classmethod
    def parse(cls, text: str) -> ParsedOutput:
        parser = cls()
        return collect([*parser.feed(text), *parser.finish()])

    def _push(self, text: str, out: DeltaBuffer) -> None:
        raise NotImplementedError

    def _finish(self, out: DeltaBuffer) -> None:
        raise NotImplementedError

    def _read(self, reader: CallReader, text: str, out: DeltaBuffer) -> str | None:
        """Feed the current call; None while it reads on, else what follows it ("" if nothing yet)."""
        used = reader.feed(text)
        if reader.committed and not self._header_sent:
            out.items.append(ToolCallDelta(self._index, self._new_id(), reader.name))
            self._header_sent = True
        if reader.committed:
            out.arguments(self._index, reader.take_arguments())
        if reader.status == DONE:
            self._index += 1
            self._header_sent = False
            self._reader = None
            return text[used:]
        return None


class HermesToolParser(ToolCallParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "text"  # "text" | "call" | "close" (after a call's object, before "</tool_call>")
        self._pending = ""  # text held back in "text" and "close"
        self._skip_ws = False  # right after a call
        self._held_ws = ""  # whitespace before the current call's open tag (content if it is no call)

    def _push(self, text: str, out: DeltaBuffer) -> None:
        while text:
            if self._state == "text":
                text = self._text(text, out)
            elif self._state == "call":
                text = self._call(text, out)
            else:
                text = self._close(text, out)

    def _text(self, text: str, out: DeltaBuffer) -> str:
        buf = self._pending + text
        if self._skip_ws:
            buf = buf.lstrip(WS)
            if not buf:
                return ""
            self._skip_ws = False
        i = buf.find(self.OPEN)
        if i >= 0:
            before = buf[:i].rstrip(WS)
            out.content(before)
            self._held_ws = buf[len(before) : i]
            self._pending, self._state, self._reader = "", "call", CallReader()
            return buf[i + len(self.OPEN) :]
        # Hold back a possible start of the open tag and the whitespace before it.
        cut = len(buf[: len(buf) - partial_suffix(buf, self.OPEN)].rstrip(WS))
        out.content(buf[:cut])
        self._pending = buf[cut:]
        return ""

    def _call(self, text: str, out: DeltaBuffer) -> str:
        reader = self._reader
        assert reader is not None
        rest = self._read(reader, text, out)
        if rest is not None:
            self._state, self._pending = "close", ""
            return rest
        if reader.status == FAILED:  # no call: the tag is content, what followed it is read again
            out.content(self._held_ws + self.OPEN)
            self._state, self._reader = "text", None
            return reader.text
        return ""

    def _close(self, text: str, out: DeltaBuffer) -> str:
        buf = self._pending + text
        rest = buf.lstrip(WS)
        if self.CLOSE.startswith(rest) and rest != self.CLOSE:
            self._pending = buf
            return ""
        self._state, self._pending, self._skip_ws = "text", "", True
        return rest.removeprefix(self.CLOSE)  # a missing close tag is forgiven

    def _finish(self, out: DeltaBuffer) -> None:
        while self._state == "call":
            assert self._reader is not None
            self._reader.close()
            self._push(self._call("", out), out)
        if self._state == "text":
            out.content(self._pending)
        self._pending = ""  # in "close": a cut-off close tag is dropped


class Llama3JsonToolParser(ToolCallParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "start"  # "start" | "call" | "sep" (between calls) | "plain" (content to the end)
        self._pending = ""  # held back in "start" and "sep"
        self._held = ""  # what preceded the first call's object (content if it is no call)

    def _push(self, text: str, out: DeltaBuffer) -> None:
        while text:
            state = self._state
            if state == "plain":
                out.content(text)
                return
            if state == "call":
                text = self._call(text, out)
                continue
            buf = self._pending + text
            rest = buf.lstrip(WS)
            if state == "start" and rest.startswith(self.PYTHON_TAG):
                rest = rest[len(self.PYTHON_TAG) :]
            elif not rest or (state == "start" and self.PYTHON_TAG.startswith(rest)):
                self._pending = buf  # undecided yet
                return
            elif state == "sep" and rest[0] == ";":
                rest = rest[1:]
            elif rest[0] != "{":  # no call (first) or after the calls: content
                self._state, self._pending = "plain", ""
                text = buf if state == "start" else rest
                continue
            self._held = buf[: len(buf) - len(rest)] if state == "start" else ""
            self._state, self._pending, self._reader = "call", "", CallReader()
            text = rest

    def _call(self, text: str, out: DeltaBuffer) -> str:
        reader = self._reader
        assert reader is not None
        rest = self._read(reader, text, out)
        if rest is not None:
            self._state = "sep"
            return rest
        if reader.status == FAILED:
            self._state, self._reader = "plain", None
            out.content(self._held + reader.text if self._index == 0 else reader.text.lstrip(WS))
        return ""

    def _finish(self, out: DeltaBuffer) -> None:
        if self._state == "call":
            assert self._reader is not None
            self._reader.close()
            self._call("", out)
        elif self._state == "start":
            out.content(self._pending)
        self._pending = ""  # in "sep": trailing whitespace or a dangling ";" is dropped


TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> type[ToolCallParser]:
    """The parser class for a `--tool-call-parser` name; ValueError naming the known ones."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None


def parse_tool_calls(text: str, parser: str) -> ParsedOutput:
    return get_tool_parser(parser).parse(text)


def detect_parser(chat_template: str | None) -> str | None:
    """The tool call format a chat template teaches its model, or None when it shows none we know."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HermesToolParser.name
    if Llama3JsonToolParser.PYTHON_TAG in chat_template or (
        "<|start_header_id|>" in chat_template and "ipython" in chat_template
    ):
        return Llama3JsonToolParser.name
    return None
