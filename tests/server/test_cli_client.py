"""`kiln models`, `kiln complete` and `kiln chat` against a live server (--url); `kiln chat`'s commands,
stats line, Ctrl-C and terminal input history."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from click.testing import Result
from server_harness import LiveServer, wait_for
from typer.testing import CliRunner

import kiln.cli
from kiln.serve.terminal import ReplyStats, chat_repl, history_path, line_reader, make_client

runner = CliRunner()


def test_models_lists_the_server_model(server: LiveServer) -> None:
    result = runner.invoke(kiln.cli.app, ["models", "--url", server.url])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\t")[0] == "tiny"


def test_complete_streams_the_same_text_as_the_api(server: LiveServer) -> None:

    expected = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "The fox", "max_tokens": 8, "temperature": 0},
    ).json()["choices"][0]["text"]
    result = runner.invoke(
        kiln.cli.app, ["complete", "The fox", "--url", server.url, "--max-tokens", "8", "--temperature", "0"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def chat(url: str, typed: str) -> Result:
    """`kiln chat --url URL`, short greedy replies, with `typed` as what the user types."""
    return runner.invoke(
        kiln.cli.app, ["chat", "--url", url, "--max-tokens", "4", "--temperature", "0"], input=typed
    )


def test_chat_repl_keeps_history_and_exits(server: LiveServer) -> None:
    result = chat(server.url, "Hello\nHow are you?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("tiny> ") == 2


def test_unreachable_url_is_a_clean_error() -> None:
    result = runner.invoke(kiln.cli.app, ["models", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "APIConnectionError" in result.output


def test_complete_in_process_serves_the_tiny_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    result = runner.invoke(
        kiln.cli.app, ["complete", "Hello", "--tiny", "--max-tokens", "4", "--temperature", "0"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    assert (tmp_path / "engines" / "tiny" / "engine.json").is_file()


class RecordingClient:
    """The real openai client, recording what each chat request sends."""

    def __init__(self, url: str) -> None:
        self.inner = make_client(url)
        self.models = self.inner.models
        self.chat = SimpleNamespace(completions=self)
        self.sent: list[dict[str, Any]] = []

    def create(self, **kwargs: Any) -> Any:
        self.sent.append(copy.deepcopy(kwargs))
        return self.inner.chat.completions.create(**kwargs)


STATS = re.compile(r"^\((\d+) tokens(, \d+\.\d tok/s)?, TTFT \d+\.\d\d s\)$")


def test_chat_commands_shape_what_is_sent(server: LiveServer) -> None:
    client = RecordingClient(server.url)
    script = [
        "/help",
        "/system Answer in French.",
        "/system",
        "Hi",
        "/temperature 3",
        "/temperature warm",
        "/temperature",
        "/temperature 0.5",
        "/max_tokens 0",
        "/max_tokens 3",
        "/frobnicate now",
        "//slash",
        "/reset",
        "Again",
        "/exit",
    ]
    lines = iter(script)
    out, err = io.StringIO(), io.StringIO()
    history = chat_repl(
        client, "tiny", out=out, err=err, read_line=lambda _: next(lines), max_tokens=4, defaults={}
    )
    text = out.getvalue()
    for command in ("/help", "/system TEXT", "/temperature X", "/max_tokens N", "/reset", "/exit"):
        assert command in text
    assert "system prompt: Answer in French." in text
    assert "temperature must be a number from 0 to 2, got '3'" in text
    assert "temperature must be a number from 0 to 2, got 'warm'" in text
    assert "temperature: not set (the server's default applies: Kiln's)" in text
    assert "max_tokens must be a whole number >= 1, got '0'" in text
    assert "unknown command /frobnicate; /help lists the commands" in text
    # three requests: "Hi", "/slash" and, after /reset, "Again"; no command reached the model
    assert [s["messages"][-1]["content"] for s in client.sent] == ["Hi", "/slash", "Again"]
    first, second, third = client.sent
    assert first["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert "temperature" not in first and first["max_tokens"] == 4  # unset: the server's default applies
    assert (second["temperature"], second["max_tokens"]) == (0.5, 3)
    assert third["messages"][:1] == [{"role": "system", "content": "Answer in French."}]  # /reset keeps it
    assert len(third["messages"]) == 2 and history[:2] == third["messages"]
    assert all(s["stream_options"] == {"include_usage": True} for s in client.sent)
    # one stats line per reply on err, counted by the server's usage (at most max_tokens)
    stats = err.getvalue().splitlines()
    assert len(stats) == 3
    counts = [int(m.group(1)) for m in map(STATS.match, stats) if m]
    assert len(counts) == 3 and counts[0] <= 4 and counts[1] <= 3, stats


def test_chat_cli_prints_stats_on_stderr(server: LiveServer) -> None:
    result = chat(server.url, "Hello\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.stderr and "TTFT" not in result.stdout
    assert "/help lists the commands" in result.stderr


def test_ctrl_c_during_a_reply_frees_it_on_the_server(server: LiveServer) -> None:
    class InterruptingOut(io.StringIO):
        """Ctrl-C arrives while the first reply streams (as the user presses it mid-answer)."""

        pressed = False

        def write(self, text: str) -> int:
            if self.getvalue().endswith("tiny> ") and not self.pressed:
                self.pressed = True
                raise KeyboardInterrupt
            return super().write(text)

    def cancelled() -> list[str]:
        metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
        return [m for m in metrics if m.startswith("kiln_requests_total") and 'outcome="cancelled"' in m]

    before = cancelled()
    lines = iter(["Tell me everything", "/exit"])
    out = InterruptingOut()
    history = chat_repl(
        make_client(server.url),
        "tiny",
        out=out,
        err=io.StringIO(),
        read_line=lambda _: next(lines),
        max_tokens=900,
        extra_body={"ignore_eos": True},
    )
    assert "(interrupted)" in out.getvalue() and history == []
    # the server saw the client go and ended the request (not run out its 900 tokens)
    assert wait_for(lambda: cancelled() != before)
    assert wait_for(lambda: server.engine.stats().num_running == 0)


def test_reply_stats_line() -> None:
    stats = ReplyStats(started=10.0, first_token=10.25, last_token=11.25, completion_tokens=11)
    assert stats.line() == "(11 tokens, 10.0 tok/s, TTFT 0.25 s)"
    assert ReplyStats(started=1.0, first_token=1.5, last_token=1.5, completion_tokens=1).line() == (
        "(1 tokens, TTFT 0.50 s)"
    )
    assert ReplyStats(started=1.0).line() == "(no text)"


def test_terminal_input_keeps_history_in_the_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    assert history_path() == tmp_path / "cache" / "chat_history"
    assert line_reader(terminal=False) is input  # pipes and scripts read plain lines
    with create_pipe_input() as pipe:
        read = line_reader(terminal=True, input=pipe, output=DummyOutput())
        pipe.send_text("What is the capital of France?\r")
        assert read("you> ") == "What is the capital of France?"
    assert "What is the capital of France?" in history_path().read_text()
    # a later session recalls it with the up arrow
    with create_pipe_input() as pipe:
        read = line_reader(terminal=True, input=pipe, output=DummyOutput())
        pipe.send_text("\x1b[A\r")
        assert read("you> ") == "What is the capital of France?"


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_quits() -> None:
    def read_line(
        _prompt: str, keys: Iterator[type[BaseException]] = iter([KeyboardInterrupt, EOFError])
    ) -> str:
        raise next(keys)

    out = io.StringIO()
    # no request is made, so no server is needed: the client is never called
    assert chat_repl(None, "tiny", out=out, err=io.StringIO(), read_line=read_line, system="s") == [
        {"role": "system", "content": "s"}
    ]
    assert out.getvalue() == "\n\n"
