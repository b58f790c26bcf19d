"""`kiln serve`'s server over a native int8 weight-only engine (the tiny model): it answers, greedily the same
tokens as the offline `kiln.LLM` on the same engine directory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_harness import open_tiny_engine, run_live_server

from kiln import LLM, SamplingParams
from kiln.build import build_tiny_engine


@pytest.fixture(scope="module")
def int8_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served-int8") / "engine"
    build_tiny_engine(out, quantization="int8-wo")
    return out


@pytest.fixture(scope="module")
def client(int8_engine_dir: Path) -> Iterator[openai.OpenAI]:
    engine = open_tiny_engine(int8_engine_dir)
    try:
        with run_live_server(engine, served_model_name="tiny-int8") as live:
            yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        asyncio.run(engine.shutdown())


def test_an_int8_engine_answers_as_offline(client: openai.OpenAI, int8_engine_dir: Path) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-int8"]
    served = client.completions.create(
        model="tiny-int8", prompt="Beautiful is better", max_tokens=8, temperature=0
    )
    choice = served.choices[0]
    assert choice.finish_reason == "length" and served.usage.completion_tokens == 8
    offline = LLM(int8_engine_dir, device="cpu").generate(
        ["Beautiful is better"], SamplingParams(temperature=0, max_tokens=8)
    )
    assert choice.text == offline[0].outputs[0].text
