"""`kiln models`, `kiln complete` and `kiln chat` against a live server (--url)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_harness import LiveServer
from typer.testing import CliRunner

import kiln.cli

runner = CliRunner()


def test_models_lists_the_server_model(server: LiveServer) -> None:
    result = runner.invoke(kiln.cli.app, ["models", "--url", server.url])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\t")[0] == "tiny"


def test_complete_streams_the_same_text_as_the_api(server: LiveServer) -> None:
    import httpx

    expected = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "The fox", "max_tokens": 8, "temperature": 0},
    ).json()["choices"][0]["text"]
    result = runner.invoke(
        kiln.cli.app, ["complete", "The fox", "--url", server.url, "--max-tokens", "8", "--temperature", "0"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_chat_repl_keeps_history_and_exits(server: LiveServer) -> None:
    result = runner.invoke(
        kiln.cli.app,
        ["chat", "--url", server.url, "--max-tokens", "4", "--temperature", "0"],
        input="Hello\nHow are you?\n/exit\n",
    )
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
