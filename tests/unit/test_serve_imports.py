"""What `kiln serve` imports before its engine process starts, and the hook that orders the imports after.

Rules checked: the modules on the path from `kiln serve` to the start of the engine process import
neither torch, transformers nor FastAPI (each costs ~0.3-1 s of a warm restart; the engine process
starts first and the server imports them while it loads, benchmarks/warm_start.py); `open_engine`'s
`may_import` runs once the child is started and before this thread loads anything heavy.
"""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kiln.clients import open as open_module
from kiln.clients.open import open_engine
from kiln.config import EngineConfig

# Imported by `kiln serve` (kiln/cli.py `serve`, `_resolve`, `_open`) before ProcessEngine starts the child.
SERVE_PATH = (
    "kiln.cli",
    "kiln.config",
    "kiln.serve.loading_engine",
    "kiln.serve.model_source",
    "kiln.clients.messages",
    "kiln.clients.open",
    "kiln.clients.process",
    "kiln.engine.process_setup",
)
HEAVY = ("torch", "transformers", "fastapi")


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_serve_path_imports_nothing_heavy_before_the_engine_process_starts() -> None:
    loaded = _run(
        f"""
        import importlib, sys
        for name in {SERVE_PATH!r}:
            importlib.import_module(name)
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert loaded == ""


def test_dtypes_import_torch_on_first_use() -> None:
    out = _run(
        """
        import sys
        import kiln.config as config
        assert config.canonical_dtype("bf16") == "bfloat16" and "torch" not in sys.modules
        try:
            config.NO_SUCH_NAME
        except AttributeError:
            pass
        else:
            raise SystemExit("no AttributeError")
        import torch
        assert config.DTYPES == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        from kiln.config import DTYPES
        assert DTYPES is config.DTYPES
        print("ok")
        """
    )
    assert out == "ok"


class Stop(Exception):
    pass


def test_may_import_runs_once_the_engine_process_started_and_a_failure_there_ends_it(tiny_gqa_dir) -> None:
    seen: list[list[str]] = []

    def may_import() -> None:
        seen.append([child.name for child in mp.active_children()])
        raise Stop

    with pytest.raises(Stop):
        open_engine(tiny_gqa_dir, EngineConfig(device="cpu", engine_process=True), may_import=may_import)
    assert seen == [["kiln-engine-core"]]
    assert "kiln-engine-core" not in [child.name for child in mp.active_children()]  # killed, not orphaned


def test_may_import_runs_before_an_engine_on_a_thread_loads(tiny_gqa_dir, monkeypatch) -> None:
    loads: list[object] = []
    monkeypatch.setattr(
        "kiln.clients.thread.AsyncEngine.from_path", classmethod(lambda cls, *args: loads.append(args))
    )

    def may_import() -> None:
        raise Stop

    with pytest.raises(Stop):
        open_engine(tiny_gqa_dir, EngineConfig(device="cpu", engine_process=False), may_import=may_import)
    assert loads == []
    open_engine(tiny_gqa_dir, EngineConfig(device="cpu", engine_process=False), may_import=lambda: None)
    assert len(loads) == 1
    assert open_module.open_engine is open_engine


def test_the_engine_imports_transformers_beside_its_weights_not_before(tmp_path: Path) -> None:
    # Importing the engine leaves transformers out (structured outputs import llguidance.hf on first use);
    # from_path then loads the tokenizer, and with it transformers, on a thread while the weights load.
    from kiln.build import build_tiny_engine

    build_tiny_engine(tmp_path / "tiny")
    out = _run(
        f"""
        import sys, threading
        from kiln.engine.llm_engine import LLMEngine
        assert "transformers" not in sys.modules, "imported with the engine"
        import kiln.models.tokenizer as tok
        real, threads = tok.Tokenizer.__init__, []
        def spy(self, *a, **kw):
            threads.append(threading.current_thread().name)
            real(self, *a, **kw)
        tok.Tokenizer.__init__ = spy
        from kiln.config import EngineConfig
        engine = LLMEngine.from_path({str(tmp_path / "tiny")!r}, EngineConfig(load_progress=False, device="cpu"))
        print(threads[0].split("_")[0], engine.tokenizer is not None)
        """
    )
    assert out == "kiln-tokenizer True"
