"""`RequestStreams.generate`: when a request reaches the loop, and that a submitted stream is aborted however
it ends: closed unread, or dropped."""

from __future__ import annotations

import asyncio
import gc

import pytest

from kiln.clients.messages import AbortRequest, AddRequest, StepReport
from kiln.clients.streams import RequestStreams
from kiln.engine.info import EngineStats
from kiln.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=3)


class Loop:
    """The loop's side as the streams see it: what was submitted, whether it takes commands."""

    def __init__(self, taking: bool) -> None:
        self.submitted: list = []
        self.started = 0
        self.taking = taking

    async def start(self) -> None:
        self.started += 1
        self.taking = True

    def streams(self, validate=lambda ids, params: None) -> RequestStreams:
        return RequestStreams(
            submit=self.submitted.append,
            validate=validate,
            start=self.start,
            running=lambda: True,  # an abort waits for its ack
            taking=lambda: self.taking,
            stats=EngineStats(),
        )


async def acknowledge(streams: RequestStreams, loop: Loop) -> None:
    """Answer the aborts submitted so far, once they are (the loop's report)."""
    await asyncio.sleep(0)
    acks = [c.ack for c in loop.submitted if isinstance(c, AbortRequest)]
    streams.receive(StepReport(outputs=[], stats=EngineStats(), acks=acks, errors=[]))


def test_a_request_is_submitted_when_opened_while_the_loop_takes_commands():
    async def main():
        loop = Loop(taking=True)
        streams = loop.streams()
        streams.generate([1, 2], PARAMS, "r", prompt="hi", priority=2, owner="o")
        assert loop.submitted == [AddRequest("r", "hi", [1, 2], PARAMS, 2, "o")]
        assert "r" in streams.sinks and loop.started == 0

    asyncio.run(main())


def test_otherwise_it_is_submitted_at_the_first_iteration_once_the_loop_started():
    async def main():
        loop = Loop(taking=False)
        streams = loop.streams()
        stream = streams.generate([1, 2], PARAMS, "r")
        assert loop.submitted == [] and streams.sinks == {}
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        assert loop.started == 1 and [type(c) for c in loop.submitted] == [AddRequest]
        first.cancel()
        done = asyncio.ensure_future(acknowledge(streams, loop))
        with pytest.raises(asyncio.CancelledError):
            await first  # cancelled while waiting: its request is aborted
        await done
        assert [type(c) for c in loop.submitted] == [AddRequest, AbortRequest] and streams.sinks == {}

    asyncio.run(main())


def test_a_refusal_comes_from_the_call_before_anything_is_submitted():
    def validate(ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("empty prompt")

    async def main():
        loop = Loop(taking=True)
        streams = loop.streams(validate)
        with pytest.raises(ValueError, match="empty prompt"):
            streams.generate([], PARAMS, "r")
        streams.generate([1], PARAMS, "r")
        with pytest.raises(ValueError, match="already in use"):
            streams.generate([1], PARAMS, "r")
        assert [c.request_id for c in loop.submitted] == ["r"]

    asyncio.run(main())


def test_a_submitted_stream_closed_unread_is_aborted_and_an_unsubmitted_one_is_not():
    async def main():
        loop = Loop(taking=True)
        streams = loop.streams()
        stream = streams.generate([1, 2], PARAMS, "r")
        await asyncio.gather(stream.aclose(), acknowledge(streams, loop))
        assert loop.submitted[1] == AbortRequest("r", loop.submitted[1].ack) and streams.sinks == {}
        await stream.aclose()  # idempotent
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        loop.taking = False
        await streams.generate([1, 2], PARAMS, "never").aclose()
        assert len(loop.submitted) == 2  # nothing submitted, nothing to abort

    asyncio.run(main())


def test_a_submitted_stream_dropped_unread_is_aborted_on_its_loop():
    async def main():
        loop = Loop(taking=True)
        streams = loop.streams()
        streams.generate([1, 2], PARAMS, "r")  # the stream is dropped at once
        gc.collect()
        for _ in range(2):  # the hand-over to this loop, then the abort it starts
            await asyncio.sleep(0)
        assert [type(c) for c in loop.submitted] == [AddRequest, AbortRequest] and streams.sinks == {}
        await acknowledge(streams, loop)

    asyncio.run(main())
