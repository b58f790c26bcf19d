"""`open_engine`: pick the backend an engine directory was built for and open it as an `EngineClient`."""

from __future__ import annotations

from pathlib import Path

from kiln.engine.options import EngineOptions
from kiln.engine.protocol import EngineClient


def open_engine(path: str | Path, options: EngineOptions | None = None) -> EngineClient:
    """An engine dir with backend "trtllm" opens through TensorRT-LLM; anything else (a native engine dir,
    a Hugging Face checkpoint dir) through the native engine: in a child process when
    `options.engine_process`, else on a thread of this one."""
    from kiln.build.manifest import EngineManifest, is_engine_dir

    options = options or EngineOptions()
    path = Path(path)
    if is_engine_dir(path) and EngineManifest.load(path).backend == "trtllm":
        from kiln.trtllm.backend import TrtLlmEngine

        return TrtLlmEngine.from_engine_dir(path, options)
    if options.engine_process:
        from kiln.engine.process_engine import ProcessEngine

        return ProcessEngine.from_path(path, options)
    from kiln.engine.async_engine import AsyncEngine

    return AsyncEngine.from_path(path, options)
