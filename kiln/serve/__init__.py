"""The OpenAI-compatible server: `create_app(engine, settings)`, `run_server(engine, settings)`, `ServerSettings`.

Exports load lazily, so `kiln --help` does not import FastAPI and uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "create_app": "kiln.serve.app",
    "run_server": "kiln.serve.runner",
    "ServerSettings": "kiln.serve.settings",
    "LoadingEngine": "kiln.serve.loading_engine",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kiln.serve' has no attribute {name!r}")
