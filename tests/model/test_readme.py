"""The README's Python examples run as written, on the default model: the offline `LLM` example, and the
OpenAI-client example against `kiln serve`'s server (its URL swapped for the test server's)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from kiln.build.default_model import DEFAULT_MODEL_NAME, ensure_default_engine
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.serve.background import serve_in_background
from kiln.serve.settings import ServerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code: str) -> str:
    """What the example printed, the weight-loading progress bar left out."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return "\n".join(line for line in out.getvalue().splitlines() if not line.startswith("loading weights"))


@pytest.fixture(scope="module")
def default_engine_dir(smollm2_gguf) -> Path:  # the GGUF fixture fetches once per session
    return ensure_default_engine(progress=False)


def test_the_readme_has_the_two_examples() -> None:
    assert len(BLOCKS) == 2 and "LLM()" in BLOCKS[0] and "OpenAI(" in BLOCKS[1]


def test_the_offline_example_answers(default_engine_dir: Path) -> None:
    printed = _run(BLOCKS[0])
    assert printed.strip(), "the LLM example printed nothing"


def test_the_openai_client_example_streams_from_the_server(default_engine_dir: Path) -> None:
    engine = AsyncEngine.from_path(default_engine_dir, EngineConfig(device="cpu", load_progress=False))
    settings = ServerSettings(port=0, log_level="warning", served_model_name=DEFAULT_MODEL_NAME)
    with serve_in_background(engine, settings) as (url, _server):
        code = BLOCKS[1].replace("http://127.0.0.1:8000", url)
        assert code != BLOCKS[1], "the example's URL changed: update this test"
        printed = _run(code)
    assert printed.strip(), "the client example printed nothing"
