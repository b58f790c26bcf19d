"""`ProcessEngine`: the native engine's step loop in a child process, behind the same `EngineClient`.

Why: in one process the HTTP front end (event loop, SSE, JSON per token) and the engine's host work
share the GIL, and every step stretches by the front end's work (measured: served throughput 37% of
offline on an H100). In its own process the engine steps while the front end streams.

How: the child builds the `LLMEngine` from a picklable factory, says `Ready`, and runs the `StepLoop` on
the commands coming down one pipe, sending each `StepReport` up the other (one message per step, its
outputs as `wire` tuples). The parent keeps the `RequestStreams` and two relay threads: a sender that
forwards the commands that queued up together as one pipe write, and a receiver that routes the reports.
Rules: the child is the only owner of the engine; an abort is acknowledged after the child freed the
blocks; if the child dies, every open request fails with EngineDeadError; batching limits set by
`set_batching` are set again in a restarted child. Importing this module does not
import torch (the engine is imported in the child, by the factory), so `kiln serve` starts the child
before its own process has imported torch and the two import in parallel
(tests/unit/test_serve_imports.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.clients.loop import CommandQueue, StepLoop
from kiln.clients.messages import (
    Command,
    EngineDeadError,
    Goodbye,
    Ready,
    SetBatching,
    Shutdown,
    StartupFailed,
    StepReport,
)
from kiln.clients.streams import RequestStreams, StreamsClient
from kiln.clients.wire import WireOutput, decode_output, encode_output
from kiln.config import EngineConfig
from kiln.engine.info import BatchingLimits, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.process_setup import prepare_process
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.validation import validate_request
from kiln.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kiln.engine.llm_engine import LLMEngine

__all__ = ["EngineDeadError", "EngineFactory", "ProcessEngine", "engine_process_main", "forward_commands"]

logger = logging.getLogger(__name__)

EngineFactory = Callable[[], "LLMEngine"]  # must be picklable (a module-level function or a partial of one)

# How long shutdown waits for the receiver and the child once the stop went down the pipe.
SHUTDOWN_TIMEOUT = 30.0


class ProcessEngine(StreamsClient):
    def __init__(
        self,
        factory: EngineFactory,
        *,
        start_timeout: float = 600.0,
        tokenizer_path: str | None = None,
        may_import: Callable[[], None] | None = None,
    ) -> None:
        """`tokenizer_path`, when known, is loaded while the child starts (~0.5 s off a start on the CPU
        machine); the tokenizer is loaded again if the child's is another. `may_import` (see
        `kiln.clients.open.open_engine`) is called once the child started, before the tokenizer loads."""
        self._factory = factory
        self._start_timeout = start_timeout
        self._batching: BatchingLimits | None = None  # what set_batching set, merged: a new child gets it too
        early: dict[str, Tokenizer] = {}

        def while_starting() -> None:
            if may_import is not None:
                may_import()
            if tokenizer_path:
                with contextlib.suppress(Exception):  # the child reports what is wrong with the files
                    early[str(tokenizer_path)] = Tokenizer(str(tokenizer_path))

        self._spawn(while_starting=while_starting)
        # The same files the child loaded.
        self._tokenizer = early.get(self._ready.tokenizer_path) or Tokenizer(self._ready.tokenizer_path)
        self._streams = RequestStreams(
            submit=lambda command: self._commands.put(command),  # the queue of the current child
            validate=self._validate,
            start=self.start,
            running=self._running,
            stats=self._ready.stats,
            taking=lambda: not self._restarting and self._running(),  # else `start` says why not
        )

    def _spawn(self, while_starting: Callable[[], None] | None = None) -> None:
        """Start a child and wait for its first word, running `while_starting` meanwhile; raises what
        the child failed to start with."""
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)  # Pipe(duplex=False) -> (receive end, send end)
        out_recv, out_send = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_child_entry,
            args=(self._factory, cmd_recv, out_send),
            name="kiln-engine-core",
            daemon=True,
        )
        process.start()
        cmd_recv.close()
        out_send.close()
        if while_starting is not None:
            try:
                while_starting()
            except BaseException:  # nobody will talk to this child
                process.kill()
                process.join()
                raise
        if not out_recv.poll(self._start_timeout):
            process.kill()
            raise EngineDeadError(f"the engine process did not start within {self._start_timeout:.0f} s")
        try:
            hello: Ready | StartupFailed = out_recv.recv()
        except EOFError:
            process.join()
            raise EngineDeadError(
                f"the engine process exited while starting (exit code {process.exitcode})"
            ) from None
        if isinstance(hello, StartupFailed):
            process.join()
            raise hello.error
        self._process = process
        self._cmd_send: Connection = cmd_send
        self._out_recv: Connection = out_recv
        self._ready = hello
        self._commands = CommandQueue()
        self._sender: threading.Thread | None = None
        self._receiver: threading.Thread | None = None
        self._restarting = False

    async def restart(self) -> None:
        """Replace the child (dead, or not answering: it is killed) with a fresh one from the same factory;
        the requests open in the old one fail with EngineDeadError, new ones until it is up too. Raises
        what the new child failed to start with."""
        self._restarting = True
        try:
            if self._process.is_alive():
                self._process.kill()
            await asyncio.to_thread(self._process.join)
            self._commands.put(Shutdown())  # the old sender (if it waits for commands) meets the broken pipe
            for relay in (self._sender, self._receiver):  # both end on the dead child's pipes
                if relay is not None:
                    await asyncio.to_thread(relay.join, SHUTDOWN_TIMEOUT)
            self._cmd_send.close()
            self._out_recv.close()
            self._streams.fail_all(EngineDeadError("the engine process was restarted"))
            await asyncio.to_thread(self._spawn)
            self._streams.stats = self._ready.stats
            if self._batching is not None:  # the first command the new child takes
                self._commands.put(SetBatching(self._batching, ack=-1))
        finally:
            self._restarting = False
        await self.start()

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        options: EngineConfig | None = None,
        *,
        may_import: Callable[[], None] | None = None,
    ) -> ProcessEngine:
        return cls(
            functools.partial(engine_from_path, path, options),
            tokenizer_path=str(Path(path)),
            may_import=may_import,
        )

    # -- EngineClient ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._ready.model_info

    async def start(self) -> None:
        if self._restarting:
            raise EngineDeadError("the engine process is restarting")
        if self._receiver is None:
            self._receiver = threading.Thread(
                target=self._receive, args=(self._out_recv,), name="kiln-engine-receiver", daemon=True
            )
            self._receiver.start()
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(
                target=forward_commands,
                args=(self._commands, self._cmd_send, self._streams.fail_all),
                name="kiln-engine-sender",
                daemon=True,
            )
            self._sender.start()

    async def set_batching(self, limits: BatchingLimits) -> None:
        """`StreamsClient.set_batching`, remembered for a restarted child."""
        await self._streams.set_batching(limits)
        given = {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)}
        self._batching = dataclasses.replace(
            self._batching or limits, **{name: value for name, value in given.items() if value is not None}
        )

    async def shutdown(self) -> None:
        """Stop the child: it aborts every request and says goodbye, which fails the open streams."""
        await self.start()  # the stop goes down the pipe, even when no request ever started the relays
        self._commands.put(Shutdown())
        await asyncio.to_thread(self._sender.join)  # type: ignore[union-attr]
        await asyncio.to_thread(self._receiver.join, SHUTDOWN_TIMEOUT)  # type: ignore[union-attr]
        await asyncio.to_thread(self._process.join, SHUTDOWN_TIMEOUT)

    # -- the parent's side of the pipes -----------------------------------------------------------------
    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(
            prompt_token_ids,
            params,
            vocab_size=self._ready.vocab_size,
            max_model_len=self._ready.max_model_len,
        )

    def _running(self) -> bool:
        return (
            self._sender is not None
            and self._sender.is_alive()
            and self._receiver is not None
            and self._receiver.is_alive()
        )

    def _dead(self) -> str | None:
        if self._restarting:
            return "the engine process is restarting"
        if not self._process.is_alive():
            return f"the engine process exited (exit code {self._process.exitcode})"
        return None if self._running() else "the engine process's relays are not running"

    def _receive(self, pipe: Connection) -> None:
        """Receiver: route each step's report to its requests, until the child says goodbye or dies."""
        while True:
            try:
                message: StepReport[WireOutput] | Goodbye = pipe.recv()
            except (EOFError, OSError):
                self._streams.fail_all(EngineDeadError("the engine process exited"))
                return
            if isinstance(message, Goodbye):
                self._streams.receive(message)
                return
            self._streams.receive(self._decoded(message))

    def _decoded(self, report: StepReport[WireOutput]) -> StepReport[RequestOutput]:
        """The report with its outputs restored with their prompts; those of closed requests are dropped."""
        outputs = []
        for wire in report.outputs:
            request = self._streams.prompt_of(wire[0])
            if request is not None:
                outputs.append(decode_output(wire, *request))
        return StepReport(outputs, report.stats, report.acks, report.errors)


def forward_commands(
    commands: CommandQueue, pipe: Connection, fail_all: Callable[[BaseException], None]
) -> None:
    """The sender: forward commands in order, those that queued up together as one message, until a
    `Shutdown` (the last of its message) went down; if the pipe is broken, `fail_all`.

    Why batches: every pipe write releases the GIL, and getting it back from the busy event loop can take
    a switch interval (5 ms). One command per write let a burst of arrivals (a wave of streams ending and
    their clients' next requests) trickle into the engine."""
    while True:
        batch: list[Command] = commands.take(block=True)
        try:
            pipe.send(batch)
        except (EOFError, OSError):
            fail_all(EngineDeadError("the engine process is gone"))
            return
        if isinstance(batch[-1], Shutdown):
            return


class PipeCommands:
    """The child's command source: the batches `forward_commands` sent, flattened in order."""

    def __init__(self, pipe: Connection) -> None:
        self._pipe = pipe

    def take(self, block: bool) -> list[Command]:
        commands: list[Command] = []
        wait = None if block else 0
        while self._pipe.poll(wait):
            commands.extend(self._pipe.recv())
            wait = 0
        return commands


def engine_from_path(path: str | Path, options: EngineConfig | None = None) -> LLMEngine:
    """`LLMEngine.from_path`, the factory `from_path` sends to the child: only the child imports the engine."""
    from kiln.engine.llm_engine import LLMEngine  # deferred: torch, imported in the child only

    return LLMEngine.from_path(path, options)


def engine_process_main(factory: EngineFactory, commands: Connection, out: Connection) -> None:
    """The child's work: build the engine, say `Ready` (or `StartupFailed`), run the step loop on the
    commands pipe, reporting up `out`; ends after `Goodbye`, or when the parent is gone."""
    try:
        engine = factory()
    except BaseException as exc:  # report any failure to load, then exit
        out.send(StartupFailed(exc))
        return
    prepare_process(engine.config)  # this process runs the engine: its RNG and GC are the engine's
    out.send(
        Ready(
            engine.model_info,
            engine.model_config.vocab_size,
            engine.max_model_len,
            engine.stats(),
            engine.tokenizer.name_or_path,
        )
    )
    try:
        StepLoop(engine, PipeCommands(commands), out.send, encode_output).run()
    except (EOFError, OSError):  # the parent is gone: nobody left to serve
        return


def _child_entry(factory: EngineFactory, commands: Connection, out: Connection) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine_process_main(factory, commands, out)
