"""The build stage: checkpoint (HF directory, GGUF file, hub id) -> engine directory with `engine.json`.

    >>> from kiln.build import build_engine
    >>> manifest = build_engine("path/to/hf-checkpoint", Path("engines/my-model"), dtype="float16")

Exports are imported lazily: `build_engine` pulls in torch and safetensors, which `kiln --help` and
code that only reads manifests should not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.build.native import build_engine, build_tiny_engine
    from kiln.engine_dir import EngineManifest, is_engine_dir

__all__ = ["EngineManifest", "build_engine", "build_tiny_engine", "is_engine_dir"]

_HOMES = {
    "EngineManifest": "kiln.engine_dir",
    "is_engine_dir": "kiln.engine_dir",
    "build_engine": "kiln.build.native",
    "build_tiny_engine": "kiln.build.native",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kiln.build' has no attribute {name!r}")
