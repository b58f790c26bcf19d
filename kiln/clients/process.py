"""`ProcessEngine`: the native engine's step loop in a child process, behind the same `EngineClient`.

Why: in one process the HTTP front end (event loop, SSE, JSON per token) and the engine's host work
share the GIL, and every step stretches by the front end's work (measured: served throughput 37% of
offline on an H100). In its own process the engine steps while the front end streams.

How: the child builds the `LLMEngine` from a picklable factory and runs the step loop; the parent
keeps `AsyncEngine`'s request bookkeeping (`generate`, `abort`, sinks) and swaps its step thread for
two relay threads over a pipe pair: commands go down, each step's outputs and stats come up in one
message (commands go down in batches too). Rules: the child is the only owner of the engine; an abort is acknowledged after the child
freed the blocks; if the child dies, every open request fails with EngineDeadError.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from kiln.clients.thread import AsyncEngine, EngineDeadError, _Abort, _Add
from kiln.clients.wire import WireOutput, decode_output, encode_output
from kiln.config import EngineConfig
from kiln.engine.gc_tuning import settle_garbage_collector
from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.validation import validate_request

logger = logging.getLogger(__name__)

EngineFactory = Callable[[], LLMEngine]  # must be picklable (a module-level function or a partial of one)


@dataclass(slots=True)
class _Ready:
    model_info: ModelInfo
    vocab_size: int
    max_model_len: int
    stats: EngineStats
    tokenizer_path: str


class ProcessEngine(AsyncEngine):
    def __init__(self, factory: EngineFactory, *, start_timeout: float = 600.0) -> None:
        from kiln.models.tokenizer import Tokenizer

        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)  # Pipe(duplex=False) -> (receive end, send end)
        out_recv, out_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_child_main, args=(factory, cmd_recv, out_send), name="kiln-engine-core", daemon=True
        )
        self._process.start()
        cmd_recv.close()
        out_send.close()
        self._cmd_send: Connection = cmd_send
        self._out_recv: Connection = out_recv
        if not out_recv.poll(start_timeout):
            self._process.kill()
            raise EngineDeadError(f"the engine process did not start within {start_timeout:.0f} s")
        ready = out_recv.recv()
        if isinstance(ready, BaseException):
            self._process.join()
            raise ready
        self._ready: _Ready = ready
        self._tokenizer = Tokenizer(ready.tokenizer_path)  # the same files the child loaded
        self._pending_aborts: dict[int, Callable[[], None]] = {}
        self._abort_ids = itertools.count()
        self._receiver: threading.Thread | None = None
        super().__init__(None, initial_stats=ready.stats)
        settle_garbage_collector()  # the front end's per-chunk garbage, as the child does for its steps

    @classmethod
    def from_path(cls, path: str | Path, options: EngineConfig | None = None) -> ProcessEngine:
        return cls(functools.partial(LLMEngine.from_path, path, options))

    # -- EngineClient ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._ready.model_info

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(
            prompt_token_ids,
            params,
            vocab_size=self._ready.vocab_size,
            max_model_len=self._ready.max_model_len,
        )

    async def start(self) -> None:
        if self._receiver is None:
            self._receiver = threading.Thread(target=self._receive, name="kiln-engine-receiver", daemon=True)
            self._receiver.start()
        await super().start()  # the sender: AsyncEngine's thread, running _run below

    async def shutdown(self) -> None:
        await super().shutdown()  # the sender forwards the stop; the child aborts everything and exits
        if self._receiver is not None:
            self._receiver.join(timeout=30)
        self._process.join(timeout=30)

    # -- relay threads --------------------------------------------------------------------------------
    def _run(self) -> None:
        """Sender: forward commands to the child, in order, as one message per batch that queued up.

        Why batches: every pipe write releases the GIL, and getting it back from the busy event loop
        can take a switch interval (5 ms). One command per write let a burst of arrivals (a wave of
        streams ending and their clients' next requests) trickle into the engine."""
        stopping = False
        while not stopping:
            batch: list[tuple[Any, ...]] = []
            command = self._commands.get()
            while True:
                if command is None:
                    stopping = True
                    break
                if isinstance(command, _Abort):
                    token = next(self._abort_ids)
                    self._pending_aborts[token] = command.done
                    batch.append(("abort", command.request_id, token))
                else:
                    batch.append(_wire_add(command))
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
            try:
                if batch:
                    self._cmd_send.send(batch)
                if stopping:
                    self._cmd_send.send(None)
            except (BrokenPipeError, EOFError, OSError):
                self._fail_all(EngineDeadError("the engine process is gone"))
                return

    def _receive(self) -> None:
        """Receiver: route each step's outputs to their requests; acknowledge aborts."""
        while True:
            try:
                message = self._out_recv.recv()
            except (EOFError, OSError):
                self._fail_all(EngineDeadError("the engine process exited"))
                return
            kind = message[0]
            if kind == "step":
                _, outputs, stats, acks, errors = message
                self._stats = stats
                self._deliver([*self._decode(outputs), *errors])
                for token in acks:
                    done = self._pending_aborts.pop(token, None)
                    if done is not None:
                        done()
            elif kind == "bye":
                self._stats = message[1]
                self._fail_all(EngineDeadError("the engine is shutting down"))
                return

    def _decode(self, outputs: list[WireOutput]) -> list[tuple[str, RequestOutput]]:
        decoded = []
        for wire in outputs:
            sink = self._sinks.get(wire[0])
            if sink is not None:  # else the request is gone (aborted, closed): nobody to tell
                decoded.append((wire[0], decode_output(wire, sink.prompt, sink.prompt_token_ids or [])))
        return decoded

    def _fail_all(self, error: BaseException) -> None:
        self._deliver([(request_id, error) for request_id in list(self._sinks)])
        for done in list(self._pending_aborts.values()):
            done()
        self._pending_aborts.clear()


def _wire_add(command: _Add) -> tuple[Any, ...]:
    return (
        "add",
        command.request_id,
        command.prompt,
        command.prompt_token_ids,
        command.params,
        command.priority,
    )


def _child_main(factory: EngineFactory, commands: Connection, out: Connection) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = factory()
    except BaseException as exc:  # report any failure to load, then exit
        out.send(exc)
        return
    out.send(
        _Ready(
            engine.model_info,
            engine.model_config.vocab_size,
            engine.max_model_len,
            engine.stats(),
            engine.tokenizer.name_or_path,
        )
    )
    while True:
        acks: list[int] = []
        errors: list[tuple[str, BaseException]] = []
        # Block while idle; otherwise take whatever arrived during the last step.
        wait = None if not engine.has_unfinished_requests() else 0
        try:
            while commands.poll(wait):
                wait = 0
                batch = commands.recv()
                if batch is None:
                    for request_id in engine.outputs.request_ids():
                        engine.abort_request(request_id)
                    out.send(("bye", engine.stats()))
                    return
                for command in batch:
                    _apply(engine, command, acks, errors)
        except (EOFError, OSError):  # the parent is gone: nobody left to serve
            return
        outputs = []
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as exc:  # one bad step must not leave requests hanging or blocks leaked
                logger.exception("engine step failed; aborting the requests in flight")
                for request_id in engine.outputs.request_ids():
                    engine.abort_request(request_id)
                    errors.append((request_id, EngineDeadError(f"engine step failed: {exc!r}")))
        out.send(("step", [encode_output(o) for o in outputs], engine.stats(), acks, errors))


def _apply(
    engine: LLMEngine, command: tuple[Any, ...], acks: list[int], errors: list[tuple[str, BaseException]]
) -> None:
    if command[0] == "abort":
        engine.abort_request(command[1])
        acks.append(command[2])
        return
    _, request_id, prompt, prompt_token_ids, params, priority = command
    try:
        engine.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids, priority=priority)
    except Exception as exc:  # reported to that request's caller; the engine goes on
        errors.append((request_id, exc))
