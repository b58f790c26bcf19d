"""Terminal clients of an OpenAI-compatible server: `kiln chat` (a REPL) and `kiln complete`.

Both talk HTTP through the official `openai` client — to a remote `--url`, or to a server this
process started in the background — so what a user sees in the terminal is exactly what any other
OpenAI client gets. Sampling fields the user did not set are not sent, so the server's defaults (the
model's generation config) apply.

`kiln chat` on a terminal reads lines with prompt_toolkit (editing, history in Kiln's cache dir);
from a pipe it reads plain lines, so scripts and tests drive the same loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from kiln.build.default_model import default_cache_dir
from kiln.errors import BackendUnavailableError

EXIT_WORDS = {"/exit", "/quit", "exit", "quit"}
HISTORY_NAME = "chat_history"


def make_client(base_url: str, api_key: str | None = None) -> Any:
    """An `openai.OpenAI` for `base_url` (the server root, or its /v1)."""
    try:
        import openai
    except ImportError:
        raise BackendUnavailableError(
            "`kiln chat` / `kiln complete` / `kiln models` need the openai package: pip install openai"
        ) from None
    root = base_url.rstrip("/")
    root = root if root.endswith("/v1") else f"{root}/v1"
    return openai.OpenAI(base_url=root, api_key=api_key or "none", max_retries=0, timeout=600)


def served_model(client: Any) -> str:
    """The first (with Kiln: the only) model the server lists."""
    return str(client.models.list().data[0].id)


@dataclass(slots=True)
class ReplyStats:
    """One streamed reply's speed as the terminal saw it (perf_counter seconds).

    TTFT runs from sending the request to the first text; tokens/s is over the decode, the tokens after
    the first (counted by the server: the stream's usage) over the time from the first text to the last."""

    started: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int | None = None  # None: the server sent no usage

    def line(self) -> str:
        if self.first_token is None or self.last_token is None:
            return "(no text)"
        parts = []
        if self.completion_tokens is not None:
            parts.append(f"{self.completion_tokens} tokens")
            decode = self.last_token - self.first_token
            if self.completion_tokens > 1 and decode > 0:
                parts.append(f"{(self.completion_tokens - 1) / decode:.1f} tok/s")
        parts.append(f"TTFT {self.first_token - self.started:.2f} s")
        return "(" + ", ".join(parts) + ")"


def stream_chat(
    client: Any,
    model: str,
    messages: list[dict[str, str]],
    stats: ReplyStats | None = None,
    thinking: Callable[[str], None] | None = None,
    **params: Any,
) -> Iterator[str]:
    """Yield the assistant's reply piece by piece; closing the generator closes the HTTP stream.
    With `stats`, asks for the stream's usage and fills `stats` in as the reply arrives; `thinking`
    gets the reasoning pieces of a server with --reasoning-parser (`delta.reasoning_content`)."""
    if stats is not None:
        params.setdefault("stream_options", {"include_usage": True})
        stats.started = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **params)
    try:
        for chunk in stream:
            usage = getattr(chunk, "usage", None)
            if stats is not None and usage is not None:
                stats.completion_tokens = usage.completion_tokens
            delta = chunk.choices[0].delta if chunk.choices else None
            reasoning = getattr(delta, "reasoning_content", None)
            if delta is None or not (delta.content or reasoning):
                continue
            if stats is not None:
                stats.last_token = time.perf_counter()
                if stats.first_token is None:
                    stats.first_token = stats.last_token
            if reasoning and thinking is not None:
                thinking(reasoning)
            if delta.content:
                yield delta.content
    finally:
        stream.close()  # the server sees the disconnect and aborts the request


def stream_completion(client: Any, model: str, prompt: str, **params: Any) -> Iterator[str]:
    stream = client.completions.create(model=model, prompt=prompt, stream=True, **params)
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                yield chunk.choices[0].text
    finally:
        stream.close()


def write_stream(pieces: Iterator[str], out: TextIO) -> str:
    """Write pieces as they arrive (flushed, so the user sees tokens stream); return the whole text."""
    text = ""
    for piece in pieces:
        out.write(piece)
        out.flush()
        text += piece
    out.write("\n")
    out.flush()
    return text


def history_path() -> Path:
    """Where `kiln chat` keeps its input history: `chat_history` in Kiln's cache dir (`KILN_CACHE_DIR`)."""
    return default_cache_dir() / HISTORY_NAME


def line_reader(
    history: Path | None = None, *, terminal: bool | None = None, **session_options: Any
) -> Callable[[str], str]:
    """How `kiln chat` reads a line. On a terminal (`terminal` None: stdin and stdout are TTYs), a
    prompt_toolkit session: line editing, and history kept in `history` (default `history_path()`) across
    sessions. Else plain `input()`: pipes and scripted input read lines as they come. `session_options`
    go to the `PromptSession` (tests pass a pipe input and a dummy output)."""
    if terminal is None:
        terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if not terminal:
        return input
    from prompt_toolkit import PromptSession  # deferred: only a terminal session needs it
    from prompt_toolkit.history import FileHistory  # deferred: as above

    path = history if history is not None else history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    session: Any = PromptSession(history=FileHistory(str(path)), **session_options)
    return session.prompt


def served_defaults(client: Any) -> dict[str, Any]:
    """The sampling defaults the server applies to requests that omit them (its model card's
    `sampling_defaults`; {} from a server that does not say)."""
    card = client.models.list().data[0]
    return dict((getattr(card, "model_extra", None) or {}).get("sampling_defaults") or {})


COMMANDS = {
    "/help": "list these commands",
    "/system TEXT": "set the system prompt and start over (alone: show it)",
    "/temperature X": "set the sampling temperature, 0 to 2 (alone: show it)",
    "/max_tokens N": "set the most tokens per reply (alone: show it)",
    "/reset": "forget the conversation (the system prompt stays)",
    "/exit": "quit (or Ctrl-D)",
}
HELP = (
    "\n".join(f"  {usage:<16} {what}" for usage, what in COMMANDS.items())
    + "\nCtrl-C stops a reply. Start a message with // to send a line that begins with /.\n"
)


@dataclass(slots=True)
class _Chat:
    """A chat's state: what the next request sends."""

    system: str | None
    params: dict[str, Any]
    defaults: dict[str, Any]
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> str:
        """Run a /command; the text to show."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/help":
            return HELP
        if name == "/reset":
            self.reset()
            return "(conversation cleared)\n"
        if name == "/system":
            if not arg:
                return f"system prompt: {self.system}\n" if self.system else "(no system prompt)\n"
            self.system = arg
            self.reset()
            return "(system prompt set; conversation cleared)\n"
        if name == "/temperature":
            return self._set(name, arg, float, lambda v: 0.0 <= v <= 2.0, "a number from 0 to 2")
        if name == "/max_tokens":
            return self._set(name, arg, int, lambda v: v >= 1, "a whole number >= 1")
        return f"unknown command {name}; /help lists the commands (// sends a line beginning with /)\n"

    def _set(self, name: str, arg: str, kind: type, ok: Callable[[Any], bool], rule: str) -> str:
        key = name[1:]
        if not arg:
            if key in self.params:
                return f"{key}: {self.params[key]}\n"
            default = self.defaults.get(key)
            where = f"the model's, {default:g}" if default is not None else "Kiln's"
            return f"{key}: not set (the server's default applies: {where})\n"
        try:
            value = kind(arg)
        except ValueError:
            value = None
        if value is None or not ok(value):
            return f"{key} must be {rule}, got {arg!r}\n"
        self.params[key] = value
        return f"({key} set to {value})\n"


class _Thought:
    """A reasoning model's thinking, shown dimmed beside the reply (with `err`, not in it): the reply
    and the history hold the answer alone."""

    def __init__(self, notes: Console) -> None:
        self.notes = notes
        self.open = False

    def write(self, text: str) -> None:
        self.notes.print(text, end="", style="dim")
        self.open = True

    def end(self) -> None:
        """End the thinking's line, if one is open."""
        if self.open:
            self.notes.print()
            self.open = False

    def after(self, pieces: Iterator[str]) -> Iterator[str]:
        """`pieces`, the thinking's line ended before the answer's first."""
        try:
            for piece in pieces:
                self.end()
                yield piece
        finally:
            pieces.close()  # type: ignore[attr-defined]


def chat_repl(
    client: Any,
    model: str,
    *,
    out: TextIO,
    err: TextIO | None = None,
    read_line: Callable[[str], str] = input,
    system: str | None = None,
    defaults: dict[str, Any] | None = None,
    **params: Any,
) -> list[dict[str, str]]:
    """Chat until EOF (Ctrl-D) or /exit; returns the final history.

    A line starting with / is a command (`COMMANDS`), never sent to the model; `//` sends the rest of
    the line from its second `/`. After each reply its speed (`ReplyStats`) goes to `err` (default
    stderr), dimmed on a terminal. Ctrl-C during a reply stops that reply (its HTTP stream is closed,
    so the server frees the request) and drops the turn; at the prompt it clears the line. `defaults`:
    the server's sampling defaults, shown by /temperature and /max_tokens when they are not set."""
    notes = Console(file=err if err is not None else sys.stderr, highlight=False, soft_wrap=True)
    chat = _Chat(system, dict(params), dict(defaults or {}))
    chat.reset()
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            out.write("\n")
            return chat.history
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if text in EXIT_WORDS:
            return chat.history
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            out.write(chat.command(text))
            continue
        message = line[1:] if text.startswith("//") else line
        chat.history.append({"role": "user", "content": message})
        out.write(f"{model}> ")
        stats = ReplyStats()
        thought = _Thought(notes)
        pieces = thought.after(stream_chat(client, model, chat.history, stats, thought.write, **chat.params))
        try:
            reply = write_stream(pieces, out)
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the session: closing the stream closes the HTTP response,
            # which aborts the request in the engine. The partial reply is dropped from the history.
            pieces.close()
            thought.end()
            out.write(" (interrupted)\n")
            chat.history.pop()
            continue
        thought.end()
        chat.history.append({"role": "assistant", "content": reply})
        notes.print(stats.line(), style="dim")
