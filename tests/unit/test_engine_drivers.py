"""The native drivers over a scripted engine: one step loop, typed messages, the same rules on a thread
and in a child process (exact message order, abort acks, failed steps, a dead child, batched commands)."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing as mp
import os
import threading
import time
from types import SimpleNamespace

import pytest

from kiln.clients.loop import CommandQueue
from kiln.clients.messages import (
    AbortRequest,
    AddRequest,
    EngineDeadError,
    Goodbye,
    Ready,
    Shutdown,
    StepReport,
)
from kiln.clients.process import ProcessEngine, engine_process_main, forward_commands
from kiln.clients.thread import AsyncEngine
from kiln.clients.wire import encode_output
from kiln.config import EngineConfig
from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.validation import validate_request

MODEL_INFO = ModelInfo(name="scripted", backend="native", max_model_len=100_000, dtype="float32")


class ScriptedEngine:
    """Stands in for LLMEngine: every request gets one token per step, numbered from 1, until its
    max_tokens. Step `fail_at` raises; a step after a request "die" was added ends the process."""

    def __init__(self, tokenizer_path: str = "unused", fail_at: int | None = None) -> None:
        self.requests: dict[str, tuple[str | None, list[int], int]] = {}
        self.produced: dict[str, int] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_at = fail_at
        self.outputs = SimpleNamespace(request_ids=lambda: list(self.requests))
        self.model_info = MODEL_INFO
        self.model_config = SimpleNamespace(vocab_size=100)
        self.max_model_len = 100_000
        self.tokenizer = SimpleNamespace(name_or_path=tokenizer_path)
        self.config = EngineConfig(seed=7)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, vocab_size=100, max_model_len=100_000)

    def take_failed(self) -> list[tuple[str, Exception]]:
        return []

    def add_request(self, request_id, prompt, params, *, prompt_token_ids, priority, owner=None) -> str:
        self.validate(prompt_token_ids, params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.requests[request_id] = (prompt, prompt_token_ids, params.max_tokens)
        self.produced[request_id] = 0
        return request_id

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        time.sleep(0.001)  # a step takes time: callers' commands arrive between steps
        if "die" in self.requests:
            os._exit(3)
        if self.steps == self.fail_at:
            raise RuntimeError("device lost")
        outputs = []
        for request_id, (prompt, prompt_token_ids, max_tokens) in list(self.requests.items()):
            self.produced[request_id] += 1
            finished = self.produced[request_id] == max_tokens
            produced = self.produced[request_id]
            outputs.append(step_output(request_id, prompt, prompt_token_ids, produced, finished))
            if finished:
                del self.requests[request_id]
        return outputs

    def stats(self) -> EngineStats:
        running = len(self.requests)
        return EngineStats(num_running=running, kv_blocks_used=running, num_steps=self.steps)


def step_output(request_id, prompt, prompt_token_ids, token: int, finished: bool) -> RequestOutput:
    completion = CompletionOutput(
        index=0, text=f" t{token}", token_ids=[token], finish_reason="length" if finished else None
    )
    return RequestOutput(request_id, prompt, prompt_token_ids, [completion], finished=finished)


def add(request_id: str, max_tokens: int, prompt_token_ids: list[int] | None = None) -> AddRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return AddRequest(request_id, None, [5, 6] if prompt_token_ids is None else prompt_token_ids, params, 0)


def stats(running: int, steps: int) -> EngineStats:
    return EngineStats(num_running=running, kv_blocks_used=running, num_steps=steps)


# -- commands -------------------------------------------------------------------------------------------
def test_a_command_queue_hands_over_everything_queued_up_to_the_stop():
    commands = CommandQueue()
    queued = [add("a", 1), AbortRequest("x", 0), add("b", 1), Shutdown(), add("late", 1)]
    for command in queued:
        commands.put(command)
    assert commands.take(block=True) == queued[:4]
    assert commands.take(block=False) == [queued[4]]
    assert commands.take(block=False) == []


class RecordingPipe:
    def __init__(self, broken: bool = False) -> None:
        self.sent: list[object] = []
        self.broken = broken

    def send(self, message: object) -> None:
        if self.broken:
            raise BrokenPipeError
        self.sent.append(message)


def test_the_sender_writes_the_commands_that_queued_together_as_one_message_with_the_stop_last():
    commands, pipe = CommandQueue(), RecordingPipe()
    queued = [add("a", 1), AbortRequest("x", 0), add("b", 1, [2, 3]), Shutdown()]
    for command in queued:
        commands.put(command)
    forward_commands(commands, pipe, fail_all=pytest.fail)  # returns once the stop went down
    assert pipe.sent == [queued]


def test_the_sender_fails_every_request_when_the_pipe_is_broken():
    commands, failures = CommandQueue(), []
    commands.put(add("a", 1))
    forward_commands(commands, RecordingPipe(broken=True), fail_all=failures.append)
    assert len(failures) == 1 and isinstance(failures[0], EngineDeadError)


# -- the loop in the child, over real pipes (on a thread here, to see the engine) --------------------------
class TimedPipe:
    """The receiving end of a pipe whose `recv` fails the test instead of waiting forever."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def recv(self) -> object:
        assert self.conn.poll(10), "nothing came up the pipe within 10 s"
        return self.conn.recv()

    def poll(self, timeout: float) -> bool:
        return self.conn.poll(timeout)


@pytest.fixture
def prepared(monkeypatch) -> list[object]:
    """The configs the child prepared its process with (recorded, not applied: the child runs on a
    thread of this test process here, whose RNG and GC must stay as they are)."""
    calls: list[object] = []
    monkeypatch.setattr("kiln.clients.process.prepare_process", calls.append)
    return calls


def test_the_child_reports_every_turn_of_the_loop_in_order(prepared):
    engine = ScriptedEngine(fail_at=4)
    cmd_recv, cmd_send = mp.Pipe(duplex=False)
    out_recv, out_send = mp.Pipe(duplex=False)
    out_recv = TimedPipe(out_recv)
    cmd_send.send([add("a", 2), add("b", 1), add("bad", 1, [])])
    child = threading.Thread(target=engine_process_main, args=(lambda: engine, cmd_recv, out_send))
    child.start()

    assert out_recv.recv() == Ready(MODEL_INFO, 100, 100_000, EngineStats(), "unused")
    assert prepared == [engine.config]  # the process is set up for its engine before it says Ready
    first = out_recv.recv()
    assert first.outputs == [
        encode_output(step_output("a", None, [5, 6], 1, False)),  # wire tuples, not RequestOutputs
        encode_output(step_output("b", None, [5, 6], 1, True)),
    ]
    assert (first.stats, first.acks) == (stats(1, 1), [])
    [(refused, error)] = [(e.request_id, e.error) for e in first.errors]
    assert refused == "bad" and isinstance(error, ValueError)  # the engine refused it; the loop goes on
    assert out_recv.recv() == StepReport(
        [encode_output(step_output("a", None, [5, 6], 2, True))], stats(0, 2), [], []
    )
    assert not out_recv.poll(0.1)  # idle: the loop waits for commands, reporting nothing

    cmd_send.send([add("c", 5), AbortRequest("c", 7)])  # aborted before it ever ran: no step
    assert out_recv.recv() == StepReport([], stats(0, 2), [7], [])
    assert engine.aborted == ["c"]

    cmd_send.send([add("d", 5)])
    assert out_recv.recv() == StepReport(
        [encode_output(step_output("d", None, [5, 6], 1, False))], stats(1, 3), [], []
    )
    failed = out_recv.recv()  # step 4 raises: "d" is aborted and told why
    assert (failed.outputs, failed.stats, failed.acks) == ([], stats(0, 4), [])
    [(request_id, error)] = [(e.request_id, e.error) for e in failed.errors]
    assert request_id == "d" and isinstance(error, EngineDeadError) and "device lost" in str(error)
    assert engine.aborted == ["c", "d"]

    cmd_send.send([add("e", 5), Shutdown()])
    assert out_recv.recv() == Goodbye(stats(0, 4))  # "e" was aborted, never stepped
    assert engine.aborted == ["c", "d", "e"]
    child.join(timeout=10)
    assert not child.is_alive()


def test_the_child_ends_quietly_when_the_parent_is_gone(prepared):
    cmd_recv, cmd_send = mp.Pipe(duplex=False)
    out_recv, out_send = mp.Pipe(duplex=False)
    out_recv = TimedPipe(out_recv)
    child = threading.Thread(target=engine_process_main, args=(ScriptedEngine, cmd_recv, out_send))
    child.start()
    assert isinstance(out_recv.recv(), Ready)
    cmd_send.close()
    child.join(timeout=10)
    assert not child.is_alive()


# -- the same loop on a thread ------------------------------------------------------------------------------
async def collect(engine, request_id: str, max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [t async for out in engine.generate([5, 6], params, request_id) for t in out.outputs[0].token_ids]


def test_a_failed_step_on_the_thread_fails_the_requests_in_flight_and_the_loop_goes_on():
    async def main():
        scripted = ScriptedEngine(fail_at=3)
        engine = AsyncEngine(scripted)
        tokens = []
        with pytest.raises(EngineDeadError, match="device lost"):
            async for out in engine.generate([5, 6], SamplingParams(max_tokens=10), "a"):
                tokens += out.outputs[0].token_ids
        assert tokens == [1, 2] and scripted.aborted == ["a"]
        assert await collect(engine, "b", 2) == [1, 2]
        await engine.shutdown()

    asyncio.run(main())


def test_an_abort_on_the_thread_returns_once_the_loop_freed_the_request():
    async def main():
        scripted = ScriptedEngine()
        engine = AsyncEngine(scripted)
        await engine.abort("never-started")  # no loop yet: nothing to wait for
        stream = engine.generate([5, 6], SamplingParams(max_tokens=1000, ignore_eos=True), "a")
        await anext(stream)
        await engine.abort("a")
        assert scripted.aborted == ["a"] and engine.stats().kv_blocks_used == 0
        await engine.abort("unknown")  # acknowledged too
        await stream.aclose()
        assert not engine._sinks
        await engine.shutdown()

    asyncio.run(main())


def test_shutting_the_thread_down_fails_open_streams():
    async def main():
        engine = AsyncEngine(ScriptedEngine())
        stream = engine.generate([5, 6], SamplingParams(max_tokens=1000, ignore_eos=True), "a")
        await anext(stream)
        await engine.shutdown()
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in stream:
                pass
        assert await collect(engine, "b", 3) == [1, 2, 3]  # the loop starts again on demand
        await engine.shutdown()

    asyncio.run(main())


# -- the same loop in a child process ---------------------------------------------------------------------
def test_the_process_driver_acks_aborts_and_fails_every_stream_when_the_child_dies(tiny_gqa_dir):
    engine = ProcessEngine(functools.partial(ScriptedEngine, str(tiny_gqa_dir)))

    async def main():
        assert engine.model_info == MODEL_INFO and engine.stats() == EngineStats()
        assert await asyncio.gather(collect(engine, "a", 3), collect(engine, "b", 2)) == [[1, 2, 3], [1, 2]]
        long = engine.generate([5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True), "long")
        await anext(long)
        await long.aclose()  # aborted: acknowledged by the child once the request is gone
        assert engine.stats().kv_blocks_used == 0
        survivor = engine.generate([5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True), "s")
        await anext(survivor)
        with pytest.raises(EngineDeadError, match="exited"):
            await collect(engine, "die", 5)
        with pytest.raises(EngineDeadError, match="exited"):
            async for _ in survivor:
                pass
        await asyncio.wait_for(engine.abort("s"), 5)  # no child to answer: returns at once
        await asyncio.wait_for(engine.shutdown(), 30)

    asyncio.run(main())
    assert engine._process.exitcode == 3
