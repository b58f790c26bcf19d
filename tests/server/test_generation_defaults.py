"""The model's generation config as the defaults of the sampling fields a request omits (vLLM's rule)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes import RecordingEngine
from server_harness import open_tiny_engine, run_live_server
from typer.testing import CliRunner

import kiln.cli
from kiln.build.native import build_engine
from kiln.clients.thread import AsyncEngine
from kiln.engine.info import ModelInfo
from kiln.serve.sampling import model_sampling_defaults
from kiln.serve.terminal import chat_repl, make_client, served_defaults

# Greedy, a top-k, and 6 new tokens: what `kiln build` records from this generation_config.json.
GENERATION = {"eos_token_id": [0, 2], "do_sample": False, "temperature": 0.0, "top_k": 5, "max_new_tokens": 6}
DEFAULTS = {"temperature": 0.0, "top_k": 5, "max_tokens": 6}


def with_generation_config(src: Path, dst: Path, config: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def greedy_engine(tiny_gqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    """The tiny model built into an engine dir from a checkpoint whose generation config says greedy."""
    root = tmp_path_factory.mktemp("greedy")
    checkpoint = with_generation_config(tiny_gqa_dir, root / "hf", GENERATION)
    build_engine(checkpoint, root / "engine", dtype="float32", served_model_name="tiny", progress=False)
    engine = open_tiny_engine(root / "engine")
    yield engine
    asyncio.run(engine.shutdown())


def _complete(url: str, **fields: object) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "The fox", **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_omitted_fields_take_the_model_defaults_and_sent_fields_win(greedy_engine: AsyncEngine) -> None:
    recorder = RecordingEngine(greedy_engine)
    with run_live_server(recorder, served_model_name="tiny") as live:
        card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        omitted = _complete(live.url)
        explicit_greedy = _complete(live.url, temperature=0, max_tokens=6, top_k=5)
        _complete(live.url, temperature=0.7, top_k=-1, max_tokens=3)
        chat = httpx.post(
            f"{live.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 200, chat.text
    assert card["sampling_defaults"] == DEFAULTS
    first, _, third, fourth = (call["params"] for call in recorder.calls)
    assert (first.temperature, first.top_k, first.max_tokens, first.top_p) == (0.0, 5, 6, 1.0)
    # greedy by default: the same text as a request that asks for greedy itself
    assert omitted["choices"][0]["text"] == explicit_greedy["choices"][0]["text"]
    assert omitted["usage"]["completion_tokens"] <= 6
    # a field the request sends wins, -1 ("no top-k") included
    assert (third.temperature, third.top_k, third.max_tokens) == (0.7, None, 3)
    assert (fourth.temperature, fourth.top_k, fourth.max_tokens) == (0.0, 5, 6)  # chat too


def test_generation_config_none_leaves_the_model_defaults_out(greedy_engine: AsyncEngine) -> None:
    recorder = RecordingEngine(greedy_engine)
    with run_live_server(recorder, served_model_name="tiny", generation_config="none") as live:
        card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        _complete(live.url)
    params = recorder.calls[0]["params"]
    assert card["sampling_defaults"] == {}
    assert (params.temperature, params.top_k) == (1.0, None)
    assert params.max_tokens == greedy_engine.model_info.max_model_len - len(
        recorder.calls[0]["prompt_token_ids"]
    )


def test_server_default_max_tokens_wins_over_the_model(greedy_engine: AsyncEngine) -> None:
    recorder = RecordingEngine(greedy_engine)
    with run_live_server(recorder, served_model_name="tiny", default_max_tokens=2) as live:
        _complete(live.url)
    assert recorder.calls[0]["params"].max_tokens == 2


def test_kiln_chat_sends_no_temperature_so_the_model_default_applies(greedy_engine: AsyncEngine) -> None:
    recorder = RecordingEngine(greedy_engine)
    lines = iter(["Hello", "/temperature", "/exit"])
    out = io.StringIO()
    with run_live_server(recorder, served_model_name="tiny") as live:
        client = make_client(live.url)
        defaults = served_defaults(client)
        chat_repl(
            client, "tiny", out=out, err=io.StringIO(), read_line=lambda _: next(lines), defaults=defaults
        )
    assert recorder.calls[0]["params"].temperature == 0.0
    assert "temperature: not set (the server's default applies: the model's, 0)" in out.getvalue()


def test_startup_log_states_the_defaults(
    greedy_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kiln.serve"), run_live_server(greedy_engine, log_level="info"):
        pass
    assert any(
        "model's generation config: max_tokens=6, temperature=0, top_k=5" in r.getMessage()
        for r in caplog.records
    )


def test_a_hugging_face_directory_served_directly_uses_its_generation_config(
    tiny_gqa_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = with_generation_config(tiny_gqa_dir, tmp_path / "good", {"temperature": 0.6, "top_p": 0.9})
    info = ModelInfo(name="m", backend="native", max_model_len=64, dtype="float32", engine_dir=str(good))
    assert model_sampling_defaults(info, "auto") == {"temperature": 0.6, "top_p": 0.9}
    assert model_sampling_defaults(info, "none") == {}
    # the tiny checkpoint's own generation_config.json lists eos ids only: no defaults
    info.engine_dir = str(tiny_gqa_dir)
    assert model_sampling_defaults(info, "auto") == {}
    # a value no request could send is not applied, and the log says why
    bad = with_generation_config(tiny_gqa_dir, tmp_path / "bad", {"temperature": -1})
    info.engine_dir = str(bad)
    with caplog.at_level(logging.WARNING, logger="kiln.serve"):
        assert model_sampling_defaults(info, "auto") == {}
    assert "temperature must be in [0, 100]" in caplog.text


def test_generation_config_flag_takes_auto_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.serve.settings import ServerSettings

    assert ServerSettings().generation_config == "auto"
    monkeypatch.setenv("KILN_GENERATION_CONFIG", "none")
    assert ServerSettings().generation_config == "none"
    result = CliRunner().invoke(kiln.cli.app, ["serve", "--tiny", "--generation-config", "vllm"])
    assert result.exit_code == 2
    assert "generation-config" in result.output


def test_llm_without_params_samples_with_the_model_defaults(greedy_engine: AsyncEngine) -> None:
    from kiln import LLM, SamplingParams

    engine_dir = greedy_engine.model_info.engine_dir
    assert engine_dir is not None
    llm = LLM(engine_dir, num_kv_blocks=64)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 5, 6)
    out = llm.generate("The fox")[0].outputs[0]
    assert (
        out.token_ids
        == llm.generate("The fox", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids
    )
    assert (
        LLM(engine_dir, generation_config="none", num_kv_blocks=64).get_default_sampling_params()
        == SamplingParams()
    )
