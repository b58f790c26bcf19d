"""`StepLoop`: the native engine's step loop, the same on `AsyncEngine`'s thread and in `ProcessEngine`'s child.

Rules:
- Only the loop touches the `LLMEngine`, so the engine needs no locks.
- Commands are taken between steps: while the engine is idle the loop blocks for the next ones; otherwise
  it takes whatever arrived during the last step, without waiting.
- Every turn ends in one `StepReport` (one wake-up, or one pipe message, per step): the step's outputs, the
  stats after it, the acks of the aborts and batching changes applied before it (so an ack means the
  blocks are free, or the limits in force) and the requests given up on.
- A `SetBatching` the engine refuses (a limit out of range; the drivers check before sending) is logged
  and acknowledged, changing nothing.
- A step that raises aborts every request in flight (each is reported with an `EngineDeadError`, after
  the outputs that came before it) and the loop goes on: one bad step must not leak blocks or leave
  callers waiting.
- A step that raises `EngineDeadError` (a tensor-parallel rank died), or the engine's `check_alive` between
  steps (so an idle engine notices too, at the next health check's command), ends the loop: the requests
  in flight get that error, then `Goodbye`, as after `Shutdown`; the engine cannot go on, and the driver's
  health check says so (`ProcessEngine`'s child exits; the server's supervisor restarts it or stops).
- From the loop's start, each Triton kernel variant the process builds is logged as a warning
  (kiln.kernels.compile_watch): every stream waits for it, and a warmed-up engine should build none.
- `Shutdown` aborts everything and ends the loop with `Goodbye`. Either way the engine is closed (its
  tensor-parallel workers stopped) when the loop ends.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol

from kiln.clients.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineDeadError,
    Goodbye,
    OutputT,
    RequestError,
    RequestFailedError,
    SetBatching,
    Shutdown,
    StepReport,
)
from kiln.engine.outputs import RequestOutput

if TYPE_CHECKING:  # torch: ProcessEngine's parent imports this module before its child starts
    from kiln.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class CommandSource(Protocol):
    def take(self, block: bool) -> list[Command]:
        """The commands that arrived, in order; waits for at least one when `block`."""
        ...


class CommandQueue:
    """Commands from any thread to one consumer (the step thread, or `ProcessEngine`'s sender)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def take(self, block: bool) -> list[Command]:
        """Everything queued, in order, up to and including a `Shutdown` (nothing after it is meant for
        this loop)."""
        try:
            batch = [self._queue.get(block=block)]
        except queue.Empty:
            return []
        while not isinstance(batch[-1], Shutdown):
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch


class StepLoop(Generic[OutputT]):
    """Runs `engine` on commands from `commands`, handing every report to `report`; outputs are reported
    as `encode` makes them (as they are on a thread, wire tuples through a pipe)."""

    def __init__(
        self,
        engine: LLMEngine,
        commands: CommandSource,
        report: Callable[[StepReport[OutputT] | Goodbye], None],
        encode: Callable[[RequestOutput], OutputT],
    ) -> None:
        self.engine = engine
        self.commands = commands
        self.report = report
        self.encode = encode

    def run(self) -> None:
        from kiln.kernels.compile_watch import compile_watch  # this is the engine's process: torch is in

        watch = compile_watch()
        if watch is not None:
            watch.warn_from_now()
        engine = self.engine
        while True:
            acks: list[int] = []
            errors: list[RequestError] = []
            for command in self.commands.take(block=not engine.has_unfinished_requests()):
                if isinstance(command, Shutdown):
                    self._abort_in_flight()
                    self._end()
                    return
                self._apply(command, acks, errors)
            outputs: list[RequestOutput] = []
            try:
                check_alive = getattr(engine, "check_alive", None)  # scripted test engines have none
                if check_alive is not None:
                    check_alive()
                if engine.has_unfinished_requests():
                    outputs = engine.step()
            except EngineDeadError as exc:  # the engine cannot go on: fail everyone, stop the loop
                logger.error("the engine died: %s", exc)
                failed = [RequestError(request_id, exc) for request_id in self._abort_in_flight()]
                self.report(StepReport([], engine.stats(), acks, [*errors, *failed]))
                self._end()
                return
            except Exception as exc:  # not one request's fault (the engine would have found it)
                logger.exception("engine step failed; aborting the requests in flight")
                error = EngineDeadError(f"engine step failed: {exc!r}")
                errors.extend(RequestError(request_id, error) for request_id in self._abort_in_flight())
            errors.extend(
                RequestError(request_id, RequestFailedError(f"this request failed in the engine: {exc!r}"))
                for request_id, exc in engine.take_failed()
            )
            self.report(StepReport([self.encode(o) for o in outputs], engine.stats(), acks, errors))

    def _apply(
        self, command: AddRequest | AbortRequest | SetBatching, acks: list[int], errors: list[RequestError]
    ) -> None:
        if isinstance(command, AbortRequest):
            self.engine.abort_request(command.request_id)
            acks.append(command.ack)
            return
        if isinstance(command, SetBatching):
            try:
                self.engine.set_batching(command.limits)
            except ValueError:
                logger.exception("batching limits refused: %s", command.limits)
            acks.append(command.ack)
            return
        try:
            self.engine.add_request(
                command.request_id,
                command.prompt,
                command.params,
                prompt_token_ids=command.prompt_token_ids,
                priority=command.priority,
                owner=command.owner,
            )
        except Exception as exc:  # reported to that request's caller; the engine goes on
            errors.append(RequestError(command.request_id, exc))

    def _end(self) -> None:
        self.report(Goodbye(self.engine.stats()))
        close = getattr(self.engine, "close", None)  # scripted test engines have none
        if close is not None:
            close()

    def _abort_in_flight(self) -> list[str]:
        request_ids = list(self.engine.outputs.request_ids())
        for request_id in request_ids:
            self.engine.abort_request(request_id)
        return request_ids
