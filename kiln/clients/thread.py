"""`AsyncEngine`: the native engine behind the `EngineClient` interface, its step loop on a thread.

The `StepLoop` runs on one background thread (torch releases the GIL while it computes, so the event loop
stays responsive); callers' commands reach it through a `CommandQueue` and its reports go straight to the
`RequestStreams` that serve `generate` and `abort`.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from kiln.clients.loop import CommandQueue, StepLoop
from kiln.clients.messages import EngineDeadError, Shutdown
from kiln.clients.streams import RequestStreams, Sink, StreamsClient
from kiln.config import EngineConfig
from kiln.engine.info import ModelInfo
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput

__all__ = ["AsyncEngine", "EngineDeadError"]


def _unchanged(output: RequestOutput) -> RequestOutput:
    return output


class AsyncEngine(StreamsClient):
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands = CommandQueue()
        self._streams = RequestStreams(
            submit=self._commands.put,
            validate=engine.validate,
            start=self.start,
            running=self._running,
            stats=engine.stats(),
        )
        self._loop = StepLoop(engine, self._commands, self._streams.receive, _unchanged)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_path(cls, path: str | Path, options: EngineConfig | None = None) -> AsyncEngine:
        return cls(LLMEngine.from_path(path, options))

    # -- EngineClient ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    async def start(self) -> None:
        if not self._running():
            self._thread = threading.Thread(target=self._loop.run, name="kiln-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Abort whatever is still running and stop the step thread."""
        if self._running():
            self._commands.put(Shutdown())
            await asyncio.to_thread(self._thread.join)  # type: ignore[union-attr]
        self._thread = None

    @property
    def _sinks(self) -> dict[str, Sink]:
        """The open requests by id (what tests watch to see a request closed)."""
        return self._streams.sinks

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _dead(self) -> str | None:
        return None if self._running() else "the engine's step thread is not running"
