"""Overlapped steps (`async_scheduling`): step N+1 is scheduled and launched before step N's tokens are
read. Every request must come out exactly as with steps run one at a time, and no block may leak.

Runs on CPU, where the launch does not return early, but every piece of bookkeeping is the same as on
CUDA: pending tokens, decodes reading their input from the previous step's token tensor, the extra
step of a request whose stop is not known yet, and the steps launched in two halves for penalties and
structured outputs.
"""

from __future__ import annotations

import pytest

from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams, StructuredOutput
from kiln.engine.structured import Grammars
from kiln.llm import accumulate


def engine_for(model_dir, overlap: bool, **opts) -> LLMEngine:
    return LLMEngine.from_path(
        model_dir, EngineConfig(device="cpu", block_size=4, async_scheduling=overlap, **opts)
    )


def run_all(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], every: int = 1):
    """Add one request every `every` steps; returns each request's accumulated output."""
    results: dict[str, RequestOutput] = {}
    waiting = list(enumerate(requests))
    step = 0
    while waiting or engine.has_unfinished_requests():
        if waiting and step % every == 0:
            i, (prompt, params) = waiting.pop(0)
            engine.add_request(str(i), params=params, prompt_token_ids=prompt)
        for delta in engine.step():
            results[delta.request_id] = accumulate(results.get(delta.request_id), delta)
        step += 1
    return [results[str(i)] for i in range(len(requests))]


def summary(out: RequestOutput) -> list[tuple]:
    return [
        (c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, c.cumulative_logprob)
        for c in out.outputs
    ]


def test_first_step_returns_nothing_and_the_next_one_its_token(tiny_gqa_dir):
    # The mark of overlap: the first call launches the prefill and returns before reading its token.
    engine = engine_for(tiny_gqa_dir, overlap=True)
    engine.add_request("r", params=SamplingParams(max_tokens=3, ignore_eos=True), prompt_token_ids=[5, 6, 7])
    assert engine.step() == []
    assert engine.has_unfinished_requests()
    (first,) = engine.step()
    assert len(first.outputs[0].token_ids) == 1


def test_every_kind_of_request_comes_out_as_with_one_step_at_a_time(tiny_gqa_dir):
    # Learn the model's greedy continuation, to place a stop string and a stop token inside it.
    probe = engine_for(tiny_gqa_dir, overlap=False)
    (base,) = run_all(probe, [([9, 10, 11, 12], SamplingParams(temperature=0, max_tokens=12, min_tokens=12))])
    ids, text = base.outputs[0].token_ids, base.outputs[0].text
    stop_string = text[len(probe.tokenizer.decode(ids[:4])) :][:3]
    assert stop_string.strip()
    requests = [
        ([9, 10, 11, 12], SamplingParams(temperature=0, max_tokens=12, stop=[stop_string])),
        ([9, 10, 11, 12], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ids[6]])),
        (
            [9, 10, 11, 12],
            SamplingParams(temperature=0, max_tokens=12, min_tokens=8, stop_token_ids=[ids[2]]),
        ),
        (list(range(3, 30)), SamplingParams(temperature=0, max_tokens=9, logprobs=2)),
        ([4, 5], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, n=2)),
        ([6, 7, 8], SamplingParams(temperature=0.8, max_tokens=10, seed=3, repetition_penalty=1.5)),
        (
            [6, 7, 8],
            SamplingParams(temperature=0, max_tokens=10, frequency_penalty=1.5, presence_penalty=0.5),
        ),
        (list(range(40, 75)), SamplingParams(temperature=0, max_tokens=1)),
        ([1], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)),
        # Structured outputs: one whose grammar completes after a few tokens (while the next step is
        # already scheduled), one sampled, one held to a schema until max_tokens.
        (
            [2, 3],
            SamplingParams(temperature=0, max_tokens=12, structured=StructuredOutput("regex", "[ab]{3}")),
        ),
        (
            [4, 6],
            SamplingParams(
                temperature=0.9, seed=5, max_tokens=20, n=2, structured=StructuredOutput.choice(["yes", "no"])
            ),
        ),
        (
            [7, 8, 9],
            SamplingParams(
                temperature=0,
                max_tokens=16,
                structured=StructuredOutput.json_schema({"type": "array", "items": {"type": "integer"}}),
            ),
        ),
    ]
    sync = run_all(engine_for(tiny_gqa_dir, overlap=False), requests)
    overlapped_engine = engine_for(tiny_gqa_dir, overlap=True)
    # Three mask-filling threads, so the two sequences of the `choice` request copy different families.
    overlapped_engine.grammars = Grammars(overlapped_engine.tokenizer.hf, threads=3)
    overlapped_engine.runner.grammars = overlapped_engine.grammars
    families = []
    matcher = overlapped_engine.grammars.matcher
    overlapped_engine.grammars.matcher = lambda structured: (
        m := matcher(structured),
        families.append(m.family),
    )[0]
    halves = []
    launch = overlapped_engine.runner.launch
    overlapped_engine.runner.launch = lambda out, fwd=None: (
        halves.append(fwd is not None),
        launch(out, fwd),
    )[1]
    held_rows = []  # per mask fill: how many rows a grammar held
    start_fill = overlapped_engine.grammars.start_fill
    overlapped_engine.grammars.start_fill = lambda matchers, mask: (
        held_rows.append(sum(m is not None for m in matchers)),
        start_fill(matchers, mask),
    )[1]
    ahead = []  # host inputs prepared before the sampling of the step they follow was queued
    host_inputs = overlapped_engine.runner.host_inputs
    overlapped_engine.runner.host_inputs = lambda out, after=None: (
        ahead.append(after is not None),
        host_inputs(out, after),
    )[1]
    overlapped = run_all(overlapped_engine, requests)
    assert any(halves) and not all(halves)  # penalties and grammars took the two-halves path, others not
    assert any(ahead)
    assert sorted(families) == [0, 0, 0, 1]  # the choice request's second sequence: another family
    assert max(held_rows) >= 2  # several rows' masks filled in the background while outputs were processed
    assert [summary(o) for o in overlapped] == [summary(o) for o in sync]
    assert len(sync[-3].outputs[0].text) == 3 and set(sync[-3].outputs[0].text) <= {"a", "b"}
    assert {c.text for c in sync[-2].outputs} <= {"yes", "no"} and len(sync[-2].outputs) == 2
    assert sync[0].outputs[0].finish_reason == "stop" and sync[0].outputs[0].stop_reason == stop_string
    assert sync[1].outputs[0].stop_reason == ids[6] and len(sync[2].outputs[0].token_ids) >= 8
    assert overlapped_engine.stats().kv_blocks_used == 0
    assert not overlapped_engine.scheduler.requests


def test_an_abort_with_a_step_in_flight_frees_everything(tiny_gqa_dir):
    engine = engine_for(tiny_gqa_dir, overlap=True)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add_request("a", params=params, prompt_token_ids=list(range(3, 20)))
    engine.add_request("b", params=params, prompt_token_ids=list(range(5, 9)))
    for _ in range(4):
        engine.step()
    engine.abort_request("a")  # a step that decodes "a" is still in flight
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"b"}
    assert outputs[-1].finished
    assert engine.stats().kv_blocks_used == 0


def test_a_tight_cache_preempts_requests_with_tokens_in_flight(tiny_gqa_dir):
    requests = [
        (list(range(3 + i, 20 + 2 * i)), SamplingParams(temperature=0, max_tokens=16)) for i in range(6)
    ]
    sync = run_all(engine_for(tiny_gqa_dir, overlap=False, num_kv_blocks=16), requests)
    engine = engine_for(tiny_gqa_dir, overlap=True, num_kv_blocks=16)
    overlapped = run_all(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert [summary(o) for o in overlapped] == [summary(o) for o in sync]
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_the_option_follows_the_device_unless_given(tiny_gqa_dir, overlap):
    assert LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu")).async_scheduling is False
    assert engine_for(tiny_gqa_dir, overlap=overlap).async_scheduling is overlap
