"""Tensor parallelism on the CPU (gloo, 2 processes): the same greedy tokens as one rank, with requests
joining mid-flight, prefix-cache hits, overlapped steps, preemption, aborts and replicated KV heads; a
dead rank ends the engine with an error naming it, at once; models and engines that cannot shard are
refused before any worker starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kiln.build.native import build_tiny_engine
from kiln.build.tiny import write_tiny_checkpoint
from kiln.clients.messages import EngineDeadError
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import InvalidEngineError
from kiln.llm import accumulate
from kiln.models.loader import load_model

MAX_NEW = 10
SHARED = [(7 * i) % 500 + 3 for i in range(24)]  # a prefix of 6 blocks of 4 tokens
PROMPTS = [[*SHARED, 11, 12], [5, 6, 7], [*SHARED, 40, 41, 42, 43, 44, 45], [300] * 17, [*SHARED, 9]]


def make_engine(model_dir: Path, tp: int, **opts: object) -> LLMEngine:
    opts = {"device": "cpu", "block_size": 4, "load_progress": False, **opts}
    return LLMEngine.from_path(model_dir, EngineConfig(tensor_parallel_size=tp, **opts))  # type: ignore[arg-type]


def greedy(max_new: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new)


def run(engine: LLMEngine, prompts: list[list[int]], max_new: int = MAX_NEW, abort: str | None = None):
    """One prompt joins every second step; `abort` is aborted after its first tokens. Returns the tokens
    of each request not aborted, by id."""
    results: dict = {}
    pending = list(enumerate(prompts))
    step = 0
    try:
        while pending or engine.has_unfinished_requests():
            if pending and step % 2 == 0:
                i, prompt = pending.pop(0)
                engine.add_request(str(i), params=greedy(max_new), prompt_token_ids=prompt)
            for delta in engine.step():
                results[delta.request_id] = accumulate(results.get(delta.request_id), delta)
            if abort is not None and abort in results:
                engine.abort_request(abort)
                del results[abort]
                abort = None
            step += 1
        stats = engine.stats()
    finally:
        engine.close()
    return {rid: out.outputs[0].token_ids for rid, out in results.items()}, stats


@pytest.mark.parametrize(
    ("model", "overlap"), [("tiny_gqa_dir", False), ("tiny_mha_dir", True)], ids=["gqa", "mha-overlapped"]
)
def test_two_ranks_give_the_tokens_of_one_with_prefix_hits(model: str, overlap: bool, request) -> None:
    model_dir = request.getfixturevalue(model)
    want, _ = run(make_engine(model_dir, 1, async_scheduling=overlap), PROMPTS)
    got, stats = run(make_engine(model_dir, 2, async_scheduling=overlap), PROMPTS)
    assert got == want and len(got) == len(PROMPTS)
    assert stats.prefix_cache_hits >= 2 * len(SHARED)
    assert stats.kv_blocks_used == 0


def test_preemption_and_abort_behave_as_on_one_rank(tiny_gqa_dir: Path) -> None:
    # 14 blocks of 4 tokens cannot hold these requests at once: the scheduler preempts.
    prompts = [[(13 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate([9, 14, 20, 11, 25, 8])]
    opts = {"num_kv_blocks": 14, "max_num_batched_tokens": 32}
    want, _ = run(make_engine(tiny_gqa_dir, 1, **opts), prompts, max_new=12, abort="2")
    got, stats = run(make_engine(tiny_gqa_dir, 2, **opts), prompts, max_new=12, abort="2")
    assert stats.num_preemptions > 0
    assert got == want and "2" not in got and len(got) == len(prompts) - 1
    assert stats.kv_blocks_used == 0


def test_two_ranks_score_prompts_as_one(tiny_gqa_dir: Path) -> None:
    """Scoring takes the logits of extra rows, gathered across ranks: every rank must score the same rows
    in the same pieces, or the collectives would not meet."""
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2)
    scores = []
    for tp in (1, 2):
        engine = make_engine(tiny_gqa_dir, tp, max_num_batched_tokens=16)
        try:
            for i, prompt in enumerate(PROMPTS[:3]):
                engine.add_request(str(i), params=params, prompt_token_ids=prompt)
            got: dict = {}
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    got[delta.request_id] = accumulate(got.get(delta.request_id), delta)
        finally:
            engine.close()
        scores.append({rid: out.prompt_logprobs for rid, out in got.items()})
    one, two = scores
    assert sorted(two) == ["0", "1", "2"]
    for rid, entries in one.items():
        assert len(two[rid]) == len(entries) == len(PROMPTS[int(rid)]) and two[rid][0] is None
        for mine, theirs in zip(entries[1:], two[rid][1:], strict=True):
            assert list(mine) == list(theirs)
            assert [e.logprob for e in theirs.values()] == pytest.approx(
                [e.logprob for e in mine.values()], abs=1e-4
            )


def test_replicated_kv_heads_and_a_padded_vocabulary(tmp_path: Path) -> None:
    # One KV head for two ranks (replicated), and 509 tokens: two slices of 255 rows, the last padded.
    model_dir = write_tiny_checkpoint(tmp_path / "mqa", seed=3, num_key_value_heads=1, vocab_size=509)
    want, _ = run(make_engine(model_dir, 1), PROMPTS[:3])
    engine = make_engine(model_dir, 2)
    assert engine.runner.kv_caches[0][0].shape[2] == 1  # rank 0 holds the one KV head
    assert engine.runner.model.model.embed_tokens.weight.shape[0] == 255
    got, _ = run(engine, PROMPTS[:3])
    assert got == want


def test_a_dead_rank_ends_the_engine_with_an_error_naming_it(tiny_gqa_dir: Path) -> None:
    engine = make_engine(tiny_gqa_dir, 2)
    try:
        engine.add_request("a", params=greedy(50), prompt_token_ids=[5, 6, 7])
        engine.step()
        assert engine.workers is not None
        worker = engine.workers._processes[0]
        worker.kill()
        worker.wait()
        began = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor-parallel rank 1 of 2 exited"):
            for _ in range(50):
                engine.step()
        assert time.monotonic() - began < 5
        with pytest.raises(EngineDeadError, match="rank 1"):  # and stays dead
            engine.step()
    finally:
        engine.close()


def test_a_rank_killed_mid_step_is_named_too(tiny_gqa_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_gqa_dir, 2)
    try:
        assert engine.workers is not None
        worker = engine.workers._processes[0]
        send = engine.runner.on_step
        assert send is not None

        def send_then_kill(host):  # the worker dies after the step went down: the collective fails
            send(host)
            worker.kill()

        engine.runner.on_step = send_then_kill
        engine.add_request("a", params=greedy(4), prompt_token_ids=[5, 6, 7])
        with pytest.raises(EngineDeadError, match="tensor-parallel rank 1"):
            engine.step()
    finally:
        engine.close()


def test_what_cannot_shard_is_refused_before_a_worker_starts(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible"):
        make_engine(tiny_gqa_dir, 3)
    quantized = tmp_path / "int8"
    build_tiny_engine(quantized, quantization="int8-wo")
    with pytest.raises(InvalidEngineError, match="tensor parallelism does not run quantized engines"):
        make_engine(quantized, 2)
    model, config = load_model(tiny_gqa_dir)
    with pytest.raises(ValueError, match="needs the engine loaded by LLMEngine"):
        LLMEngine(model, config, None, config=EngineConfig(tensor_parallel_size=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantized native engines"):
        build_tiny_engine(tmp_path / "q2", quantization="int8-wo", tensor_parallel_size=2)


def test_build_records_the_default_size_and_serve_overrides_it(tmp_path: Path) -> None:
    engine_dir = tmp_path / "tp2"
    manifest = build_tiny_engine(engine_dir, tensor_parallel_size=2)
    assert manifest.extra["tensor_parallel_size"] == 2
    engine = make_engine(engine_dir, None)  # type: ignore[arg-type]
    try:
        assert engine.workers is not None and engine.model_info.extra["tensor_parallel_size"] == 2
    finally:
        engine.close()
    one = make_engine(engine_dir, 1)
    assert one.workers is None and one.model_info.extra["tensor_parallel_size"] == 1
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible"):
        build_tiny_engine(tmp_path / "tp3", tensor_parallel_size=3)
