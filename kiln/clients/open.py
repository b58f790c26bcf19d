"""`open_engine`: pick the backend an engine directory was built for and open it as an `EngineClient`."""

from __future__ import annotations

from pathlib import Path

from kiln.clients.protocol import EngineClient
from kiln.config import EngineConfig
from kiln.engine_dir import EngineManifest, is_engine_dir


def open_engine(path: str | Path, options: EngineConfig | None = None) -> EngineClient:
    """An engine dir with backend "trtllm" opens through TensorRT-LLM; anything else (a native engine dir,
    a Hugging Face checkpoint dir) through the native engine: in a child process when
    `options.engine_process`, else on a thread of this one."""
    options = options or EngineConfig()
    path = Path(path)
    if is_engine_dir(path) and EngineManifest.load(path).backend == "trtllm":
        from kiln.clients.trtllm import TrtLlmEngine  # deferred: the TensorRT-LLM client (tensorrt_llm)

        return TrtLlmEngine.from_engine_dir(path, options)
    if options.engine_process:
        from kiln.clients.process import ProcessEngine  # deferred: the native engine (torch, Triton)

        return ProcessEngine.from_path(path, options)
    from kiln.clients.thread import AsyncEngine  # deferred: the native engine (torch, Triton)

    return AsyncEngine.from_path(path, options)
