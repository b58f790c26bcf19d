"""Tool calls in a model's output, as OpenAI `tool_calls`: the types, and the reader of one call object.

The formats are in kiln.serve.tool_parsers (hermes, llama3_json); the grammars that force a call, for
`tool_choice` "required" or a named function, in kiln.serve.tool_grammar.

Rules of a call object (`{"name": ..., "arguments": {...}}`, "parameters" read as "arguments"):
- It is committed when it reads `{"name": "<string>", "arguments": {`: the id and name are emitted then,
  and the arguments stream out as the model writes them (the exact text of the arguments object). The
  call stands from there on: if the output is cut off, its arguments are what was written (possibly
  incomplete JSON, as OpenAI's may be); text after its arguments that is not JSON ends the object.
- An object in another key order (or with arguments given as a JSON string) is read to its end and
  judged by `json.loads`; its call then comes out whole. One that is not a call (invalid JSON, no
  string "name", no "arguments"/"parameters" object) is given back to the format, which makes it content.
- The object's top level is checked as it comes, so text that is no call fails at once; nested values
  are only scanned for their end (a committed call's arguments are not validated).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

WS = " \t\r\n"
_ARG_KEYS = ("arguments", "parameters")
_SCALAR_START = frozenset("-0123456789tfn")
_SCALAR_END = frozenset(",}" + WS)


def new_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None  # None when the output has no text outside its calls
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One streamed piece of call `index`: its first delta has id and name (and arguments ""), the
    following ones only an arguments fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


Delta = ContentDelta | ToolCallDelta


def collect(deltas: Iterable[Delta]) -> ParsedOutput:
    """The message that a stream of deltas adds up to."""
    content: list[str] = []
    calls: list[list[Any]] = []  # [id, name, [argument fragments]] by index
    for d in deltas:
        if isinstance(d, ContentDelta):
            content.append(d.text)
        elif d.name is not None:
            calls.append([d.id, d.name, [d.arguments]])
        else:
            calls[d.index][2].append(d.arguments)
    text = "".join(content)
    return ParsedOutput(text or None, [ToolCall(i, n, "".join(a)) for i, n, a in calls])


class DeltaBuffer:
    """Deltas of one feed/finish, adjacent content and adjacent argument fragments merged."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[Delta] = []

    def content(self, text: str) -> None:
        if text:
            last = self.items[-1] if self.items else None
            if isinstance(last, ContentDelta):
                self.items[-1] = ContentDelta(last.text + text)
            else:
                self.items.append(ContentDelta(text))

    def arguments(self, index: int, text: str) -> None:
        if text:
            last = self.items[-1] if self.items else None
            if isinstance(last, ToolCallDelta) and last.index == index and last.name is None:
                self.items[-1] = replace(last, arguments=last.arguments + text)
            else:
                self.items.append(ToolCallDelta(index, arguments=text))


READING, DONE, FAILED = range(3)
# Where the reader is in the call object (at its top level, except _NESTED).
_OPEN, _KEY_OR_END, _KEY_START, _KEY, _COLON, _VALUE, _STRING, _NESTED, _SCALAR, _AFTER = range(10)


class CallReader:
    """Reads one call object a character at a time (the rules are in the module's docstring).

    `feed` text (leading whitespace allowed), then look at `status`: READING wants more; DONE the call
    is read (`feed` said how much of the last text was the object's); FAILED it is no call, and `text`
    is everything fed. `committed` and `name` as soon as the name is known; `take_arguments` the
    arguments text not yet taken. `close` when the output ends.
    """

    __slots__ = (
        "args_end", "args_start", "committed", "depth", "esc", "in_str", "key_start", "keys", "name",
        "obj_start", "pending_args", "phase", "pos", "sent", "spans", "status", "text",
    )  # fmt: skip

    def __init__(self) -> None:
        self.text = ""  # everything fed
        self.pos = 0  # characters of text processed
        self.status = READING
        self.phase = _OPEN
        self.depth = 0
        self.in_str = self.esc = False
        self.key_start = self.obj_start = -1
        self.keys: list[str] = []
        self.spans: list[list[int]] = []  # [start, end) of each member's value in text
        self.committed = False  # the call's name is known and it stands
        self.name = ""
        self.args_start = self.args_end = -1  # the streamed arguments object
        self.sent = 0  # characters of it handed out
        self.pending_args = ""  # a call judged whole: its arguments, handed out once

    def feed(self, chunk: str) -> int:
        """Read chunk; returns how many of its characters belong to the object (all, unless it ended)."""
        self.text += chunk
        start, text, step = self.pos, self.text, self._step
        while self.pos < len(text) and self.status == READING and step(text[self.pos]):
            self.pos += 1
        if self.status == DONE:
            return self.pos - start
        return len(chunk)

    def close(self) -> None:
        """The output ended: a committed call stands as it is; anything else was no call."""
        if self.status == READING:
            self.status = DONE if self.committed else FAILED

    def take_arguments(self) -> str:
        if self.pending_args:
            text, self.pending_args = self.pending_args, ""
            return text
        if self.args_start < 0:
            return ""
        end = self.args_end if self.args_end >= 0 else self.pos
        text = self.text[self.args_start + self.sent : end]
        self.sent += len(text)
        return text

    def _step(self, ch: str) -> bool:
        """Process ch (at self.pos); False when ch is left for whatever follows the object."""
        pos = self.pos
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.phase == _KEY:
                    try:
                        self.keys.append(json.loads(self.text[self.key_start : pos + 1]))
                    except ValueError:
                        return self._fail()
                    self.phase = _COLON
                elif self.phase == _STRING:
                    self.spans[-1][1] = pos + 1
                    self.phase = _AFTER
            return True
        phase = self.phase
        if phase == _NESTED:
            if ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self.spans[-1][1] = pos + 1
                    self.phase = _AFTER
                    if self.args_start >= 0 and self.args_end < 0:
                        self.args_end = pos + 1
            return True
        if phase == _SCALAR:
            if ch not in _SCALAR_END:
                return True
            self.spans[-1][1] = pos
            self.phase = phase = _AFTER
        if ch in WS:
            return True
        if phase == _OPEN:
            if ch != "{":
                return self._fail()
            self.depth, self.obj_start, self.phase = 1, pos, _KEY_OR_END
        elif phase in (_KEY_OR_END, _KEY_START):
            if ch == '"':
                self.in_str, self.key_start, self.phase = True, pos, _KEY
            elif ch == "}" and phase == _KEY_OR_END:
                return self._close()
            else:
                return self._fail()
        elif phase == _COLON:
            if ch != ":":
                return self._fail()
            self.phase = _VALUE
        elif phase == _VALUE:
            self.spans.append([pos, -1])
            if ch == '"':
                self.in_str, self.phase = True, _STRING
            elif ch in "{[":
                self.depth, self.phase = 2, _NESTED
                if ch == "{":
                    self._maybe_commit(pos)
            elif ch in _SCALAR_START:
                self.phase = _SCALAR
            else:
                return self._fail()
        elif ch == ",":  # _AFTER
            self.phase = _KEY_START
        elif ch == "}":
            return self._close()
        else:
            return self._fail()
        return True

    def _maybe_commit(self, pos: int) -> None:
        """At the "{" of the second member's value: is this `{"name": "...", "arguments": {`?"""
        keys = self.keys
        if len(keys) != 2 or keys[0] != "name" or keys[1] not in _ARG_KEYS:
            return
        start, end = self.spans[0]
        if self.text[start] != '"':
            return
        try:
            name = json.loads(self.text[start:end])
        except ValueError:
            return
        if name:
            self.committed, self.name, self.args_start = True, name, pos

    def _fail(self) -> bool:
        # A committed call ends where its object stops making sense; the rest is left to the format.
        self.status = DONE if self.committed else FAILED
        return False

    def _close(self) -> bool:
        self.depth, self.status = 0, DONE
        if not self.committed:
            self._judge(self.text[self.obj_start : self.pos + 1])
        return True

    def _judge(self, text: str) -> None:
        """A whole object not read as a call on the way: is it one after all?"""
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        key = next((k for k in _ARG_KEYS if isinstance(obj, dict) and k in obj), None)
        name = obj.get("name") if key else None
        if not isinstance(name, str) or not name:
            self.status = FAILED
            return
        args = obj[key]
        if isinstance(args, dict):
            i = len(self.keys) - 1 - self.keys[::-1].index(key)  # json.loads keeps the last duplicate
            self.pending_args = self.text[self.spans[i][0] : self.spans[i][1]]
        elif isinstance(args, str) and _is_json_object(args):
            self.pending_args = args
        else:
            self.status = FAILED
            return
        self.committed, self.name = True, name


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
