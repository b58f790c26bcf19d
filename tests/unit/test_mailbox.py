"""The stream plumbing between the step loop and the server: `Mailbox` (one reader, emptied whole),
`coalesce` (a backlog of deltas as one), and `RequestStreams` handing a consumer that fell behind its
backlog as one delta, an error only after what came before it."""

from __future__ import annotations

import asyncio
import functools

import pytest

from kiln.clients.mailbox import Mailbox
from kiln.clients.messages import RequestError, StepReport
from kiln.clients.streams import RequestStreams
from kiln.engine.info import EngineStats
from kiln.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, accumulate, coalesce
from kiln.engine.sampling_params import SamplingParams


def test_take_returns_everything_put_in_order_and_waits_when_empty():
    async def main():
        box: Mailbox[int] = Mailbox()
        box.put(1)
        box.put(2)
        assert await box.take() == [1, 2]
        reader = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing there: it waits
        box.put(3)
        box.put(4)
        assert await reader == [3, 4]

    asyncio.run(main())


def test_a_cancelled_take_loses_nothing_and_a_second_reader_is_refused():
    async def main():
        box: Mailbox[str] = Mailbox()
        reader = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="one reader"):
            await box.take()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        box.put("kept")
        assert await box.take() == ["kept"]

    asyncio.run(main())


def _delta(
    text: str, tokens: list[int], *, index: int = 0, finish=None, logprobs=None, cached=0
) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt="p",
        prompt_token_ids=[9, 9],
        outputs=[
            CompletionOutput(
                index=index,
                text=text,
                token_ids=tokens,
                logprobs=logprobs,
                cumulative_logprob=-float(len(text)),
                finish_reason=finish,
                stop_reason="." if finish == "stop" else None,
            )
        ],
        finished=finish is not None,
        metrics=RequestMetrics(arrival_time=float(len(tokens))),
        num_cached_tokens=cached,
    )


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_coalesce_equals_folding_the_deltas_with_accumulate(with_logprobs):
    def lp(token: int):
        return [{token: Logprob(-0.5, 1)}] if with_logprobs else None

    deltas = [
        _delta("Hel", [1], logprobs=lp(1)),
        _delta("lo", [2], index=1, logprobs=lp(2)),
        _delta(" wor", [3, 4], logprobs=lp(3), cached=2),
        _delta("ld", [5], index=1, finish="stop", logprobs=lp(5)),
        _delta("", [], finish="length", logprobs=lp(6)),
    ]
    expected = functools.reduce(accumulate, deltas, None)
    got = coalesce(deltas)
    assert got == expected
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in got.outputs] == [
        (0, "Hel wor", [1, 3, 4], "length"),
        (1, "lold", [2, 5], "stop"),
    ]
    assert got.finished and got.num_cached_tokens == 0 and got.metrics == deltas[-1].metrics
    assert coalesce(deltas[:1]) is deltas[0]


async def _open_stream():
    """Streams with no loop behind them, one request "r" open and its first output awaited."""
    submitted: list = []

    async def start() -> None:
        return None

    streams = RequestStreams(
        submit=submitted.append,
        validate=lambda ids, params: None,
        start=start,
        running=lambda: False,  # no loop to acknowledge an abort: it returns at once
        stats=EngineStats(),
    )
    stream = streams.generate([1, 2], SamplingParams(max_tokens=3), "r")
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the request is submitted and its reader waits
    return streams, submitted, stream, first


def _report(*outputs: RequestOutput, errors=()) -> StepReport[RequestOutput]:
    return StepReport(outputs=list(outputs), stats=EngineStats(), acks=[], errors=list(errors))


def test_a_consumer_that_fell_behind_gets_its_backlog_as_one_delta():
    async def main():
        streams, submitted, stream, first = await _open_stream()
        assert len(submitted) == 1  # the AddRequest
        for piece in (_delta("a", [1]), _delta("b", [2]), _delta("c", [3], finish="length")):
            streams.receive(_report(piece))
        await asyncio.sleep(0)  # the hand-overs run on the loop
        out = await first
        assert (out.outputs[0].text, out.outputs[0].token_ids, out.finished) == ("abc", [1, 2, 3], True)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        assert streams.sinks == {}

    asyncio.run(main())


def test_an_error_is_raised_after_the_outputs_that_came_before_it():
    async def main():
        streams, _, stream, first = await _open_stream()
        streams.receive(_report(_delta("a", [1]), _delta("b", [2])))
        streams.receive(_report(errors=[RequestError("r", RuntimeError("step failed"))]))
        await asyncio.sleep(0)
        out = await first
        assert out.outputs[0].text == "ab" and not out.finished
        with pytest.raises(RuntimeError, match="step failed"):
            await anext(stream)

    asyncio.run(main())
