"""`RequestStreams`: the caller side of a native driver (`generate`, `abort`, `stats`), whatever runs the loop.

Rules:
- `generate` validates before anything is queued and refuses an id already open, at once. While the loop
  takes commands it also submits the `AddRequest` at once, not at the stream's first iteration: a
  server's handlers each hand their request over as they run, so a burst of arrivals reaches the engine
  while the burst is still being read, not after its last handler. Otherwise (the loop not started, or
  restarting) the stream starts the loop and submits at its first iteration. Each request's outputs
  arrive in its own `Mailbox`.
- A stream whose request was submitted aborts it when closed unfinished (`aclose`), iterated or not.
- `receive` takes the loop's reports (on the step thread, or `ProcessEngine`'s receiver thread) and hands
  every item to its request's queue with one `call_soon_threadsafe` per event loop per report, not one per
  request: with hundreds of streams, per-request wake-ups were a large share of the front end's work.
- A consumer that fell behind gets everything queued for it as one delta (one SSE chunk), so a slow
  front end catches up instead of handling every token; an error is raised after what came before it.
- `abort` returns once the loop acknowledged it (the blocks are free), or at once when no loop runs;
  `set_batching` likewise once the limits are in force, after checking them against the ceilings the
  engine reported (ValueError, nothing sent).
- `fail_all` (a `Goodbye`, a dead child) fails every open request and releases every waiting abort.
The two sides share only dict operations (atomic under the GIL) and `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from kiln.clients.mailbox import Mailbox
from kiln.clients.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineDeadError,
    Goodbye,
    SetBatching,
    StepReport,
)
from kiln.engine.info import BatchingLimits, EngineStats, check_batching
from kiln.engine.outputs import RequestOutput, coalesce
from kiln.engine.sampling_params import SamplingParams

# How often an abort still waiting for its ack checks that a loop is still there to send it.
ABORT_CHECK_SECONDS = 1.0


@dataclass(slots=True)
class Sink:
    """Where one open request's outputs go, and its prompt (a pipe's outputs do not carry it)."""

    loop: asyncio.AbstractEventLoop
    mailbox: Mailbox[RequestOutput | BaseException]
    prompt: str | None
    prompt_token_ids: list[int]


def _wake(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    with contextlib.suppress(RuntimeError):  # that caller's loop has closed: nobody waits
        loop.call_soon_threadsafe(event.set)


def _put_all(
    batch: list[tuple[Mailbox[RequestOutput | BaseException], RequestOutput | BaseException]],
) -> None:
    for target, item in batch:
        target.put(item)


class RequestStreams:
    """`submit` hands a command to the loop's side; `validate` raises ValueError for a request the engine
    can never run; `start` starts the loop (idempotent); `running` says whether a loop can still answer;
    `taking` whether it takes commands now, `start` having nothing to do (default: `running`)."""

    def __init__(
        self,
        *,
        submit: Callable[[Command], None],
        validate: Callable[[list[int], SamplingParams], None],
        start: Callable[[], Awaitable[None]],
        running: Callable[[], bool],
        stats: EngineStats,
        taking: Callable[[], bool] | None = None,
    ) -> None:
        self._submit = submit
        self._validate = validate
        self._start = start
        self._running = running
        self._taking = taking or running
        self.stats = stats  # the last report's
        self.sinks: dict[str, Sink] = {}  # open request id -> where its outputs go
        self._pending_acks: dict[int, Callable[[], None]] = {}  # ack -> what wakes its waiter
        self._acks = itertools.count()

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
        owner: str | None = None,
    ) -> OutputStream:
        """The request's outputs; validated now, and submitted now while the loop takes commands (rules)."""
        self._validate(prompt_token_ids, params)  # raises before anything is queued
        if request_id in self.sinks:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = list(prompt_token_ids)
        stream = OutputStream(self, request_id, AddRequest(request_id, prompt, ids, params, priority, owner))
        if self._taking():
            stream.submit()
        return stream

    def _open(self, command: AddRequest) -> Mailbox[RequestOutput | BaseException]:
        """Register the request's sink, then submit it: its outputs can never arrive before the sink."""
        if command.request_id in self.sinks:
            raise ValueError(f"request id {command.request_id!r} is already in use")
        outputs: Mailbox[RequestOutput | BaseException] = Mailbox()
        sink = Sink(asyncio.get_running_loop(), outputs, command.prompt, command.prompt_token_ids)
        self.sinks[command.request_id] = sink
        self._submit(command)
        return outputs

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its KV blocks are back in the pool (within one step)."""
        await self._acknowledged(functools.partial(AbortRequest, request_id))

    async def set_batching(self, limits: BatchingLimits) -> None:
        """Change the engine's batching limits (None: unchanged); returns once they are in force (within
        one step). ValueError for a limit under 1 or above the engine's ceiling."""
        ceiling = self.stats.batching_ceiling
        if ceiling is None:
            raise ValueError("this engine does not report its batching limits")
        check_batching(limits, ceiling)
        await self._start()  # as `generate`: the limits must reach a loop
        await self._acknowledged(functools.partial(SetBatching, limits))

    async def _acknowledged(self, command: Callable[[int], Command]) -> None:
        """Submit `command(ack)` and wait for its ack; at once when no loop runs, or once it stopped."""
        if not self._running():
            return
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        ack = next(self._acks)
        self._pending_acks[ack] = functools.partial(_wake, loop, done)
        self._submit(command(ack))
        while True:
            try:
                await asyncio.wait_for(done.wait(), ABORT_CHECK_SECONDS)
                return
            except TimeoutError:
                if not self._running():  # the loop ended without answering: nothing holds the blocks
                    self._pending_acks.pop(ack, None)
                    return

    def prompt_of(self, request_id: str) -> tuple[str | None, list[int]] | None:
        """An open request's prompt and its ids; None once it is closed."""
        sink = self.sinks.get(request_id)
        return None if sink is None else (sink.prompt, sink.prompt_token_ids)

    def receive(self, report: StepReport[RequestOutput] | Goodbye) -> None:
        self.stats = report.stats
        if isinstance(report, Goodbye):
            self.fail_all(EngineDeadError("the engine is shutting down"))
            return
        self._deliver(
            [
                *((output.request_id, output) for output in report.outputs),
                *((failed.request_id, failed.error) for failed in report.errors),
            ]
        )
        for ack in report.acks:
            done = self._pending_acks.pop(ack, None)
            if done is not None:
                done()

    def fail_all(self, error: BaseException) -> None:
        self._deliver([(request_id, error) for request_id in list(self.sinks)])
        while self._pending_acks:
            with contextlib.suppress(KeyError):  # popped by an abort that gave up meanwhile
                self._pending_acks.popitem()[1]()

    def _deliver(self, items: Iterable[tuple[str, RequestOutput | BaseException]]) -> None:
        batches: dict[
            asyncio.AbstractEventLoop,
            list[tuple[Mailbox[RequestOutput | BaseException], RequestOutput | BaseException]],
        ] = {}
        for request_id, item in items:
            sink = self.sinks.get(request_id)
            if sink is not None:  # else the request is closed: nobody to tell
                batches.setdefault(sink.loop, []).append((sink.mailbox, item))
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # that caller's loop has closed: nobody to tell
                loop.call_soon_threadsafe(_put_all, batch)


class OutputStream:
    """One request's outputs, as an async iterator: deltas, coalesced when the reader fell behind, the
    last one finished; an error after what came before it. Submitted by `RequestStreams.generate` or at
    the first `__anext__` (after starting the loop); once submitted, closing it unfinished aborts the
    request (shielded: a second cancellation cannot skip it), whether it was iterated or not. Dropped
    unclosed, it is aborted on its loop, as an abandoned async generator is closed by its loop."""

    def __init__(self, streams: RequestStreams, request_id: str, command: AddRequest) -> None:
        self._streams = streams
        self._request_id = request_id
        self._command = command
        self._outputs: Mailbox[RequestOutput | BaseException] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None  # taken with outputs before it: raised after them
        self._finished = self._closed = False

    def submit(self) -> None:
        self._outputs = self._streams._open(self._command)
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        try:
            if self._outputs is None:
                await self._streams._start()
                self.submit()
            assert self._outputs is not None
            while self._error is None:
                deltas: list[RequestOutput] = []
                for item in await self._outputs.take():
                    if isinstance(item, BaseException):
                        self._error = item
                        break
                    deltas.append(item)
                if deltas:
                    out = coalesce(deltas)
                    if out.finished:
                        self._finished = True
                        self._streams.sinks.pop(self._request_id, None)
                    return out
            raise self._error
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._outputs is None:  # never submitted: nothing to give back
            return
        self._streams.sinks.pop(self._request_id, None)
        if not self._finished:  # closed early (client gone, task cancelled) or failed: free its blocks now
            await asyncio.shield(self._streams.abort(self._request_id))

    def __del__(self) -> None:
        if self._loop is None or self._closed or self._finished:
            return
        with contextlib.suppress(RuntimeError):  # its loop has closed: no engine left to tell
            self._loop.call_soon_threadsafe(_abandoned, self._streams, self._request_id)


_ABANDONED: set[asyncio.Future[None]] = set()  # aborts of dropped streams, held until they end


def _abandoned(streams: RequestStreams, request_id: str) -> None:
    streams.sinks.pop(request_id, None)
    abort = asyncio.ensure_future(streams.abort(request_id))
    _ABANDONED.add(abort)
    abort.add_done_callback(_ABANDONED.discard)


# The request id a health probe aborts: no request has it, so the abort only proves the loop answers.
HEALTH_PROBE_ID = "kiln-health-probe"


class StreamsClient:
    """The `EngineClient` calls a native driver answers from its `RequestStreams` (`self._streams`);
    the driver adds what depends on where its loop runs (tokenizer, model_info, start, shutdown) and
    `_dead()`, why its loop cannot answer (None while it can)."""

    _streams: RequestStreams

    def _dead(self) -> str | None:
        raise NotImplementedError

    async def check_health(self, timeout: float) -> None:
        """Raise EngineDeadError unless the step loop runs and answers within `timeout` seconds: an abort
        of no request, acknowledged once the loop finished the step it was in."""
        if (reason := self._dead()) is not None:
            raise EngineDeadError(reason)
        try:
            await asyncio.wait_for(self._streams.abort(HEALTH_PROBE_ID), timeout)
        except TimeoutError:
            raise EngineDeadError(f"the engine did not answer within {timeout:g} s") from None
        if (reason := self._dead()) is not None:
            raise EngineDeadError(reason)

    def stats(self) -> EngineStats:
        return self._streams.stats

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
        owner: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self._streams.generate(
            prompt_token_ids, params, request_id, prompt=prompt, priority=priority, owner=owner
        )

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once the loop has freed its KV blocks (within one step)."""
        await self._streams.abort(request_id)

    async def set_batching(self, limits: BatchingLimits) -> None:
        """Change the scheduler's admission interval, token budget and running-sequence cap (None:
        unchanged), never above what the engine was configured with (ValueError); returns once they are
        in force. Not part of `EngineClient`: the TensorRT-LLM backend cannot (kiln.serve.slo)."""
        await self._streams.set_batching(limits)
