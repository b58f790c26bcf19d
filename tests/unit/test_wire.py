"""The engine process's output wire format: exact round trip, and far smaller than pickled objects."""

from __future__ import annotations

import pickle

from kiln.clients.messages import StepReport
from kiln.clients.wire import decode_output, encode_output
from kiln.engine.info import EngineStats
from kiln.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def output(i: int, **kw) -> RequestOutput:
    return RequestOutput(
        request_id=f"cmpl-{i:032x}",
        prompt=kw.get("prompt"),
        prompt_token_ids=list(range(128)),
        outputs=kw.get("outputs", [CompletionOutput(index=0, text=" w123", token_ids=[123])]),
        finished=kw.get("finished", False),
        metrics=kw.get("metrics", RequestMetrics(arrival_time=1.0, first_scheduled_time=2.5)),
        num_cached_tokens=kw.get("num_cached_tokens", 0),
        prompt_logprobs=kw.get("prompt_logprobs"),
    )


def test_round_trip_is_exact():
    rich = output(
        1,
        prompt="hello",
        finished=True,
        num_cached_tokens=16,
        prompt_logprobs=[None, {9: Logprob(-2.5, 4, " x"), 3: Logprob(-0.2, 1, "y")}],
        outputs=[
            CompletionOutput(
                index=0,
                text="a",
                token_ids=[5],
                logprobs=[{5: Logprob(-0.1, 1, "a")}],
                cumulative_logprob=-0.1,
                finish_reason="stop",
                stop_reason="zz",
            ),
            CompletionOutput(index=1, text="bc", token_ids=[6, 7], finish_reason="length"),
        ],
    )
    for out in (rich, output(2, metrics=None)):
        wire = pickle.loads(pickle.dumps(encode_output(out)))
        assert decode_output(wire, out.prompt, out.prompt_token_ids) == out


def test_a_step_report_of_256_outputs_fits_a_pipe_buffer():
    outs = [output(i) for i in range(256)]
    as_objects = len(pickle.dumps(StepReport(outs, EngineStats(), [], [])))
    report = StepReport([encode_output(o) for o in outs], EngineStats(), [3], [])
    on_the_wire = len(pickle.dumps(report))
    assert as_objects > 64 * 1024 > on_the_wire and on_the_wire * 4 < as_objects
    received = pickle.loads(pickle.dumps(report))
    assert received == report
    restored = [
        decode_output(w, o.prompt, o.prompt_token_ids) for w, o in zip(received.outputs, outs, strict=True)
    ]
    assert restored == outs
