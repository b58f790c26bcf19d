"""`AsyncEngine`: the native engine behind the `EngineClient` interface.

The step loop runs on one background thread (torch releases the GIL while it computes, so the
event loop stays responsive). Callers talk to it through a command queue; outputs come back to each
request's asyncio.Queue through `loop.call_soon_threadsafe`. Only the step thread touches the
`LLMEngine`, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import EngineConfig
from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput, accumulate
from kiln.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop failed; the request could not be completed."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int


@dataclass(slots=True)
class _Abort:
    request_id: str
    done: Callable[[], None]


@dataclass(slots=True)
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt: str | None = None  # the request's prompt, for relays that do not carry it (ProcessEngine)
    prompt_token_ids: list[int] | None = None


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for target, item in batch:
        target.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None, *, initial_stats: EngineStats | None = None) -> None:
        self.engine = engine  # None in ProcessEngine, whose engine lives in a child process
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # request id -> where its outputs go
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = initial_stats if initial_stats is not None else engine.stats()  # type: ignore[union-attr]

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

    def stats(self) -> EngineStats:
        return self._stats

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    async def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Abort whatever is still running and stop the step thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        self._validate(prompt_token_ids, params)  # raises before anything is queued
        if request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already in use")
        await self.start()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        prompt_token_ids = list(prompt_token_ids)
        self._sinks[request_id] = _Sink(asyncio.get_running_loop(), outputs, prompt, prompt_token_ids)
        self._commands.put(_Add(request_id, prompt, prompt_token_ids, params, priority))
        finished = False
        error: BaseException | None = None
        try:
            while True:
                item = error or await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind gets everything already queued as one delta: a slow
                # stream then costs one chunk per wake-up, not one per token, and catches up.
                pieces = [item]
                while not pieces[-1].finished and not outputs.empty():
                    queued = outputs.get_nowait()
                    if isinstance(queued, BaseException):
                        error = queued  # raised once what came before it has been handed over
                        break
                    pieces.append(queued)
                if len(pieces) > 1:
                    item = functools.reduce(accumulate, pieces, None)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._sinks.pop(request_id, None)
            # Closed early (client gone, task cancelled) or failed: give the blocks back now. Shielded, so a
            # second cancellation (servers cancel a disconnected stream's task) cannot skip the abort.
            if not finished:
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its KV blocks are back in the pool (within one step)."""
        if self._thread is None or not self._thread.is_alive():
            return
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        self._commands.put(_Abort(request_id, lambda: loop.call_soon_threadsafe(done.set)))
        await done.wait()

    # -- the step thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            # Block while idle; otherwise take whatever commands arrived during the last step.
            block = not engine.has_unfinished_requests()
            try:
                while True:
                    command = self._commands.get(block=block)
                    block = False
                    if command is None:
                        self._abort_all(EngineDeadError("the engine is shutting down"))
                        self._stats = engine.stats()
                        return
                    self._apply(command)
            except queue.Empty:
                pass
            if not engine.has_unfinished_requests():
                self._stats = engine.stats()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # one bad step must not leave requests hanging or blocks leaked
                logger.exception("engine step failed; aborting the requests in flight")
                self._abort_all(EngineDeadError(f"engine step failed: {exc!r}"))
                continue
            self._stats = engine.stats()
            self._deliver((output.request_id, output) for output in outputs)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._stats = self.engine.stats()
            command.done()
            return
        try:
            self.engine.add_request(
                command.request_id,
                command.prompt,
                command.params,
                prompt_token_ids=command.prompt_token_ids,
                priority=command.priority,
            )
        except Exception as exc:
            self._deliver([(command.request_id, exc)])

    def _deliver(self, items: Iterable[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their requests' queues with one wake-up per event loop per call, not one per
        request: with hundreds of streams, per-request wake-ups were a large share of the front end's work."""
        batches: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]
        ] = {}
        for request_id, item in items:
            sink = self._sinks.get(request_id)
            if sink is not None:
                batches.setdefault(sink.loop, []).append((sink.queue, item))
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # that caller's loop has closed: nobody to tell
                loop.call_soon_threadsafe(_put_all, batch)

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.outputs.request_ids()):
            self.engine.abort_request(request_id)
            self._deliver([(request_id, error)])
