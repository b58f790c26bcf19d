"""Prompt logprobs (`SamplingParams.prompt_logprobs`) against transformers on the same weights (CPU, fp32).

Every prompt position after the first must carry the prompt token's logprob and rank and the top
alternatives of transformers' log_softmax at the position before it, whatever chunks the prompt is
computed in, with steps one at a time or overlapped, when the prompt's blocks are already in the prefix
cache (a scored prompt is computed whole), under preemption, and for n > 1 (the first sample scores).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.config import EngineConfig
from kiln.engine import prompt_logprobs
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import PromptLogprobs, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import RequestValidationError
from kiln.llm import accumulate


@pytest.fixture(scope="module")
def hf_model(tiny_gqa_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_gqa_dir, dtype=torch.float32).eval()


def prompt_of(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, params=params, prompt_token_ids=prompt)
    results: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            results[delta.request_id] = accumulate(results.get(delta.request_id), delta)
    assert engine.stats().kv_blocks_used == 0
    return results


def assert_matches(got: PromptLogprobs | None, ref: torch.Tensor, prompt: list[int], top: int) -> None:
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    for position in range(1, len(prompt)):
        entry, row, token = got[position], ref[position - 1], prompt[position]
        assert entry is not None
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        values, ids = torch.topk(row, top)
        ranked = [tid for tid in entry if entry[tid].rank <= top]
        assert ranked == ids.tolist()[: len(ranked)] and len(ranked) >= top - (token in ids.tolist()[:top])
        for tid, lp in zip(ids.tolist(), values.tolist(), strict=True):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
        assert len(entry) == top + (token not in ids.tolist())


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("budget", [7, 256], ids=["chunked", "whole"])
def test_prompt_logprobs_match_transformers(tiny_gqa_dir, hf_model, overlap, budget):
    engine = LLMEngine.from_path(
        tiny_gqa_dir,
        EngineConfig(device="cpu", block_size=4, max_num_batched_tokens=budget, async_scheduling=overlap),
    )
    vocab = hf_model.config.vocab_size
    prompts = {"a": prompt_of(vocab, 23, 1), "b": prompt_of(vocab, 2, 2), "c": prompt_of(vocab, 40, 3)}
    tops = {"a": 3, "b": 0, "c": 5}
    out = run(
        engine,
        {
            rid: (prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=tops[rid]))
            for rid, prompt in prompts.items()
        },
    )
    for rid, prompt in prompts.items():
        assert_matches(out[rid].prompt_logprobs, reference(hf_model, prompt), prompt, tops[rid])


def test_rows_scored_in_pieces_match_transformers(tiny_gqa_dir, hf_model, monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_PIECE", 4)  # 39 rows in 10 pieces, the last of 3
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
    prompt = prompt_of(hf_model.config.vocab_size, 40, 6)
    out = run(engine, {"r": (prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=4))})
    assert_matches(out["r"].prompt_logprobs, reference(hf_model, prompt), prompt, 4)


def test_a_cached_prompt_is_computed_again_to_be_scored(tiny_gqa_dir, hf_model):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", block_size=4))
    prompt = prompt_of(hf_model.config.vocab_size, 30, 4)
    plain = run(engine, {"warm": (prompt, SamplingParams(temperature=0.0, max_tokens=2))})
    assert plain["warm"].prompt_logprobs is None
    scored = run(
        engine, {"scored": (prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1))}
    )
    assert scored["scored"].num_cached_tokens == 0
    assert_matches(scored["scored"].prompt_logprobs, reference(hf_model, prompt), prompt, 1)
    again = run(engine, {"again": (prompt, SamplingParams(temperature=0.0, max_tokens=2))})
    assert again["again"].num_cached_tokens == 28  # an unscored prompt still takes the cached blocks


def test_prompt_logprobs_under_preemption(tiny_gqa_dir, hf_model):
    # 12 blocks of 4 tokens cannot hold six prompts of 14-20 tokens and their outputs: the scheduler preempts.
    engine = LLMEngine.from_path(
        tiny_gqa_dir, EngineConfig(device="cpu", block_size=4, num_kv_blocks=12, max_num_batched_tokens=10)
    )
    vocab = hf_model.config.vocab_size
    prompts = {str(i): prompt_of(vocab, 14 + i, 10 + i) for i in range(6)}
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, prompt_logprobs=2)
    out = run(engine, {rid: (prompt, params) for rid, prompt in prompts.items()})
    assert engine.stats().num_preemptions > 0
    for rid, prompt in prompts.items():
        assert_matches(out[rid].prompt_logprobs, reference(hf_model, prompt), prompt, 2)


def test_n_samples_share_one_scored_prompt(tiny_gqa_dir, hf_model):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", block_size=4))
    prompt = prompt_of(hf_model.config.vocab_size, 17, 5)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=4, prompt_logprobs=2)
    out = run(engine, {"r": (prompt, params)})["r"]
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert_matches(out.prompt_logprobs, reference(hf_model, prompt), prompt, 2)
    assert engine.stats().prefix_cache_hits >= 2 * 16  # the other samples took the scored prompt's blocks


def test_prompt_logprobs_come_in_the_first_output_only(tiny_gqa_dir):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
    engine.add_request("r", params=SamplingParams(max_tokens=4, prompt_logprobs=0), prompt_token_ids=[5])
    deltas = [d for _ in range(20) for d in engine.step()]
    assert [d.prompt_logprobs for d in deltas] == [[None]] + [None] * (len(deltas) - 1)


@pytest.mark.parametrize("value", [-1, 21])
def test_prompt_logprobs_out_of_range_is_refused(value):
    with pytest.raises(RequestValidationError) as info:
        SamplingParams(prompt_logprobs=value)
    assert info.value.field == "prompt_logprobs"
