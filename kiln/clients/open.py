"""`open_engine`: pick the backend an engine directory was built for and open it as an `EngineClient`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiln.clients.process import ProcessEngine
from kiln.clients.protocol import EngineClient
from kiln.config import EngineConfig
from kiln.engine_dir import EngineManifest, is_engine_dir


def open_engine(
    path: str | Path, options: EngineConfig | None = None, *, may_import: Callable[[], None] | None = None
) -> EngineClient:
    """An engine dir with backend "trtllm" opens through TensorRT-LLM; anything else (a native engine dir,
    a Hugging Face checkpoint dir) through the native engine: in a child process when
    `options.engine_process`, else on a thread of this one.

    `may_import` returns once this thread may import the engine's libraries (torch, transformers,
    TensorRT-LLM): called before they load here, after a `ProcessEngine`'s child started. `kiln serve`
    opens the engine on a thread while another imports the web stack, and a library imported by two
    threads at once can be seen half-initialized (transformers' lazy module raised AttributeError)."""
    options = options or EngineConfig()
    path = Path(path)
    wait = may_import or (lambda: None)
    if is_engine_dir(path) and EngineManifest.load(path).backend == "trtllm":
        wait()
        from kiln.clients.trtllm import TrtLlmEngine  # deferred: the TensorRT-LLM client (tensorrt_llm)

        return TrtLlmEngine.from_engine_dir(path, options)
    if options.engine_process:
        return ProcessEngine.from_path(path, options, may_import=wait)
    wait()
    from kiln.clients.thread import AsyncEngine  # deferred: the native engine (torch, Triton)

    return AsyncEngine.from_path(path, options)
