"""Terminal clients of an OpenAI-compatible server: `kiln chat` (a REPL) and `kiln complete`.

Both talk HTTP through the official `openai` client — to a remote `--url`, or to a server this
process started in the background — so what a user sees in the terminal is exactly what any other
OpenAI client gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TextIO

from kiln.errors import BackendUnavailableError

EXIT_WORDS = {"/exit", "/quit", "exit", "quit"}


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


def stream_chat(client: Any, model: str, messages: list[dict[str, str]], **params: Any) -> Iterator[str]:
    """Yield the assistant's reply piece by piece; closing the generator closes the HTTP stream."""
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **params)
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
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


def chat_repl(
    client: Any,
    model: str,
    *,
    out: TextIO,
    read_line: Callable[[str], str] = input,
    system: str | None = None,
    **params: Any,
) -> list[dict[str, str]]:
    """Chat until EOF or /exit; `/reset` forgets the conversation; Ctrl-C during a reply stops that
    reply. Returns the final history."""
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    while True:
        try:
            line = read_line("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        if line.strip() in EXIT_WORDS:
            return history
        if line.strip() == "/reset":
            history = list(base)
            out.write("(conversation cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        out.write(f"{model}> ")
        pieces = stream_chat(client, model, history, **params)
        try:
            reply = write_stream(pieces, out)
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the session: closing the stream closes the HTTP response,
            # which aborts the request in the engine. The partial reply is dropped from the history.
            pieces.close()
            out.write(" (interrupted)\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
