"""The native engine against Hugging Face transformers on the same weights (CPU, fp32).

Greedy tokens must be identical with requests joining mid-flight, prefix-cache hits and forced
preemption, for an MHA and a GQA model, with steps run one at a time and overlapped (the next step
scheduled and launched before the previous one's tokens are read).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.llm import accumulate

MAX_NEW = 12


def hf_greedy(hf_model, prompt_ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=False,
    )
    return out[0, len(prompt_ids) :].tolist()


def greedy(max_new: int = MAX_NEW, **kw) -> SamplingParams:
    # min_tokens == max_tokens keeps EOS out, as min_new_tokens does for transformers.
    return SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new, **kw)


def prompts_of(vocab: int, lengths: list[int], seed: int = 0, shared_prefix: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        body = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompts.append((shared_prefix or []) + body)
    return prompts


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, every: int = 2):
    """Add one prompt every `every` steps so requests join while others are mid-decode."""
    results: dict[str, object] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), params=params, prompt_token_ids=prompt)
        for delta in engine.step():
            results[delta.request_id] = accumulate(results.get(delta.request_id), delta)
        step += 1
    return [results[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.fixture(scope="module", params=["tiny_gqa_dir", "tiny_mha_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request) -> bool:
    return request.param


def make_engine(model_dir, **opts) -> LLMEngine:
    opts.setdefault("device", "cpu")
    return LLMEngine.from_path(model_dir, EngineConfig(**opts))


def test_greedy_matches_transformers_with_requests_joining_mid_flight(model_dir, hf_model, overlap):
    engine = make_engine(model_dir, block_size=4, max_num_batched_tokens=24, async_scheduling=overlap)
    prompts = prompts_of(hf_model.config.vocab_size, [1, 3, 7, 16, 17, 30, 45, 64, 5])
    got = run_staggered(engine, prompts, greedy())
    assert got == [hf_greedy(hf_model, p) for p in prompts]
    assert engine.stats().kv_blocks_used == 0


def test_greedy_matches_with_prefix_cache_hits(model_dir, hf_model, overlap):
    engine = make_engine(model_dir, block_size=4, async_scheduling=overlap)
    shared = prompts_of(hf_model.config.vocab_size, [24], seed=7)[0]
    prompts = prompts_of(hf_model.config.vocab_size, [1, 6, 9, 13], seed=3, shared_prefix=shared)
    got = run_staggered(engine, prompts, greedy(), every=3)
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 3 * 24  # every prompt after the first reuses the shared blocks
    assert got == [hf_greedy(hf_model, p) for p in prompts]


def test_greedy_matches_under_preemption(model_dir, hf_model, overlap):
    # 14 blocks of 4 tokens cannot hold 8 requests of ~20-40 tokens: the scheduler must preempt.
    engine = make_engine(
        model_dir, block_size=4, num_kv_blocks=14, max_num_batched_tokens=32, async_scheduling=overlap
    )
    prompts = prompts_of(hf_model.config.vocab_size, [9, 14, 20, 11, 25, 8, 17, 12], seed=5)
    got = run_staggered(engine, prompts, greedy(max_new=16), every=1)
    assert engine.stats().num_preemptions > 0
    assert got == [hf_greedy(hf_model, p, max_new=16) for p in prompts]
    assert engine.stats().kv_blocks_used == 0


def test_logprobs_match_transformers(model_dir, hf_model, overlap):
    engine = make_engine(model_dir, async_scheduling=overlap)
    prompt = prompts_of(hf_model.config.vocab_size, [10], seed=11)[0]
    engine.add_request("r", params=greedy(max_new=4, logprobs=3), prompt_token_ids=prompt)
    total = None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            total = accumulate(total, delta)
    completion = total.outputs[0]
    ids = torch.tensor([prompt + completion.token_ids[:-1]])
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(ids).logits[0, len(prompt) - 1 :].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        assert entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(ref[step, token].item(), abs=1e-4)
        top = torch.topk(ref[step], 3)
        assert list(entry)[:3] == top.indices.tolist()
        for tid, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True))
    )
    assert math.isfinite(completion.cumulative_logprob)
