"""The native engine on CUDA: decode CUDA graphs against eager, and greedy parity with transformers.

Run on the GPU machine (scripts/gpu_check.sh); skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.build.tiny import write_tiny_checkpoint
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.kernels import long_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MAX_NEW = 24


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run(engine: LLMEngine, batch: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, p in enumerate(batch):
        engine.add_request(str(i), params=params, prompt_token_ids=p)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)
    return [tokens[str(i)] for i in range(len(batch))]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_graphs_give_the_same_tokens_as_eager(tiny_gqa_dir, dtype):
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    batch = prompts(512, [3, 17, 40, 5, 64, 9, 33, 1, 70, 12, 8])
    results = []
    for eager in (True, False):
        engine = LLMEngine.from_path(
            tiny_gqa_dir, EngineConfig(device="cuda", dtype=dtype, enforce_eager=eager, max_num_seqs=16)
        )
        assert (engine.runner.graphs is None) == eager
        results.append(run(engine, batch, greedy))
    assert results[0] == results[1]


def test_greedy_matches_transformers_in_fp16(tiny_mha_dir):
    engine = LLMEngine.from_path(tiny_mha_dir, EngineConfig(device="cuda", dtype="float16"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_mha_dir, dtype=torch.float16).cuda().eval()
    batch = prompts(512, [4, 19, 33], seed=3)
    got = run(engine, batch, SamplingParams(temperature=0, max_tokens=12, min_tokens=12))
    agree = 0
    for prompt, tokens in zip(batch, got, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
        agree += tokens == ref[0, len(prompt) :].tolist()
    # fp16 rounding may flip a near-tie late in a sequence; most sequences must agree exactly.
    assert agree >= 2


def test_kv_cache_is_sized_from_free_gpu_memory(tiny_gqa_dir):
    engine = LLMEngine.from_path(
        tiny_gqa_dir, EngineConfig(device="cuda", dtype="float16", gpu_memory_utilization=0.5)
    )
    total = torch.cuda.mem_get_info()[1]
    # A tiny model leaves nearly all of its half of the card to the KV cache, and nothing beyond it.
    assert 0.40 * total < torch.cuda.memory_allocated() < 0.52 * total
    assert engine.kv_cache.num_blocks > 1000


def test_overlapped_steps_give_the_same_outputs_as_one_at_a_time(tiny_gqa_dir):
    """On CUDA the launch really returns before the GPU is done, so this is where a step that read a
    pending token too early, or a pinned buffer reused too soon, would show."""
    batch = prompts(512, [3, 17, 40, 5, 64, 9, 33, 1, 70, 12, 8, 100, 2, 50], seed=5)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=MAX_NEW, seed=11),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=7, logprobs=3),
    ]
    results = []
    for overlap in (False, True):
        # 40 blocks of 16 tokens for 14 requests of up to 124 tokens: some are preempted.
        engine = LLMEngine.from_path(
            tiny_gqa_dir,
            EngineConfig(device="cuda", dtype="float16", async_scheduling=overlap, num_kv_blocks=40),
        )
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), params=params[i % len(params)], prompt_token_ids=prompt)
        outputs: dict[str, list] = {str(i): [] for i in range(len(batch))}
        while engine.has_unfinished_requests():
            for out in engine.step():
                c = out.outputs[0]
                logprobs = None if c.logprobs is None else [sorted(e) for e in c.logprobs]
                outputs[out.request_id].append((c.token_ids, c.finish_reason, logprobs))
        assert engine.stats().kv_blocks_used == 0
        results.append([[t for chunk in outputs[str(i)] for t in chunk[0]] for i in range(len(batch))])
        results.append([outputs[str(i)][-1][1:] for i in range(len(batch))])
    assert results[0] == results[2] and results[1] == results[3]


@pytest.mark.parametrize(
    ("bound", "lengths"),
    [
        (None, [2, 5, 16, 17, 100, 128, 300, 511, 512, 513, 700]),
        (1000, [2, 5, 16, 513, 700, 999, 1000, 1001]),
    ],
    ids=["default", "prefill_graph_tokens=1000"],
)
def test_prefill_graphs_give_the_same_tokens_as_eager(tiny_gqa_dir, bound, lengths):
    """Prompts arriving alone, up to `prefill_graph_tokens` (512 by default), run their prefill as a graph
    (padded to a bucket); the second of each pair hits the first one's cached blocks, so the graph also
    attends over a cached prefix."""
    shared = prompts(512, [40], seed=9)[0]
    singles = prompts(512, lengths, seed=8)
    greedy = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    knobs = {} if bound is None else {"prefill_graph_tokens": bound}
    results = []
    for eager in (True, False):
        engine = LLMEngine.from_path(
            tiny_gqa_dir,
            EngineConfig(
                device="cuda",
                dtype="float16",
                enforce_eager=eager,
                max_model_len=1024,
                **({} if eager else knobs),  # eager captures no graphs, so it refuses a size for them
            ),
        )
        replays = []
        if not eager:
            assert engine.runner.prefill_graphs is not None
            real_run = engine.runner.prefill_graphs.run
            engine.runner.prefill_graphs.run = lambda ids, *a, real=real_run, seen=replays: (
                seen.append(ids.shape[0]) or real(ids, *a)
            )
        got = [run(engine, [p], greedy)[0] for p in singles]
        got += [run(engine, [shared + p[:7]], greedy)[0] for p in singles[:3]]
        results.append(got)
        if not eager:
            # Every prompt up to the bound; then 42 tokens, and 13 and 15 after a 32-token prefix hit.
            assert set(replays) == {n for n in lengths if n <= (bound or 512)} | {42, 13, 15}
    assert results[0] == results[1]


def test_piecewise_graphs_give_the_same_tokens_as_eager(tiny_gqa_dir):
    """Requests arrive one per step, so steps mix prefills into decodes: those replay the piecewise
    graphs (attention eager between them), padded to a bucket; tokens must equal eager's."""
    batch = prompts(512, [3, 17, 40, 5, 64, 9, 33, 1, 70, 12, 8, 100, 2, 50], seed=6)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    results = []
    for eager in (True, False):
        options = EngineConfig(
            device="cuda",
            dtype="float16",
            enforce_eager=eager,
            piecewise_graphs=True,
            max_num_batched_tokens=256,
        )
        engine = LLMEngine.from_path(tiny_gqa_dir, options)
        used = []
        assert list(engine.graph_capture_seconds) == ([] if eager else ["piecewise", "prefill", "decode"])
        if not eager:
            graphs = engine.runner.piecewise_graphs
            assert graphs is not None and graphs.buckets[-1] == 256
            real_run = graphs.run
            graphs.run = lambda ids, *a, real=real_run, seen=used: seen.append(ids.shape[0]) or real(ids, *a)
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
        waiting = list(enumerate(batch))
        while waiting or engine.has_unfinished_requests():
            if waiting:
                i, prompt = waiting.pop(0)
                engine.add_request(str(i), params=greedy, prompt_token_ids=prompt)
            for out in engine.step():
                tokens[out.request_id].extend(out.outputs[0].token_ids)
        results.append([tokens[str(i)] for i in range(len(batch))])
        if not eager:
            assert len(used) >= 10  # the mixed steps went through the pieces
    assert results[0] == results[1]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="long prompts go to cuDNN on Hopper GPUs only",
)
def test_long_prompts_give_the_same_tokens_through_cudnn_as_through_triton(tmp_path, monkeypatch):
    """Two fresh prompts of 1,300 and 2,000 tokens and a short one in one step: the long ones' attention
    runs in cuDNN (kiln.kernels.long_prompts), against the same engine with everything in Triton. The
    kernels round differently, so a near-tie may flip a late token: the first tokens must agree, and
    most sequences wholly."""
    # Heads of 64 (256 wide, 4 heads), positions enough for a 2,000-token prompt.
    model_dir = write_tiny_checkpoint(
        tmp_path / "tiny", seed=7, hidden_size=256, num_attention_heads=4, max_position_embeddings=4096
    )
    batch = prompts(512, [2000, 1300, 30], seed=8)
    greedy = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    calls: list[int] = []
    real = long_prompts.attend_fresh_prompt

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(long_prompts, "attend_fresh_prompt", counted)
    monkeypatch.setattr(long_prompts, "LONG_PROMPT_TOKENS", 1024)  # the prompts stay quick to write
    results = []
    for offload in (True, False):
        if not offload:
            monkeypatch.setattr(long_prompts, "device_offloads", lambda *_: False)
        config = EngineConfig(device="cuda", dtype="float16", max_model_len=4096, max_num_batched_tokens=4096)
        calls.clear()
        engine = LLMEngine.from_path(model_dir, config)
        assert not calls  # the start-up's memory profile runs with the offload suspended
        results.append(run(engine, batch, greedy))
        assert len(calls) == (2 * 2 if offload else 0)  # both long prompts, in each of the two layers
    assert [r[0] for r in results[0]] == [r[0] for r in results[1]]
    assert sum(a == b for a, b in zip(*results, strict=True)) >= 2


def test_prompt_logprobs_on_cuda_match_transformers(tiny_gqa_dir):
    """Scored prompts in chunks through CUDA graphs (piecewise for mixed steps) and overlapped steps: each
    position's logprob is transformers' at fp16 tolerance, which grows with the logprob's size; a row
    scored against the wrong token would be off by several nats."""
    engine = LLMEngine.from_path(
        tiny_gqa_dir,
        EngineConfig(device="cuda", dtype="float16", piecewise_graphs=True, max_num_batched_tokens=32),
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_gqa_dir, dtype=torch.float16).cuda().eval()
    batch = prompts(512, [70, 5, 33, 2], seed=9)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3)
    for i, p in enumerate(batch):
        engine.add_request(str(i), params=params, prompt_token_ids=p)
    scores: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                scores[out.request_id] = out.prompt_logprobs
    for i, prompt in enumerate(batch):
        got = scores[str(i)]
        assert len(got) == len(prompt) and got[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt], device="cuda")).logits[0].float(), dim=-1).cpu()
        for position in range(1, len(prompt)):
            entry, token = got[position], prompt[position]
            assert entry[token].logprob == pytest.approx(ref[position - 1, token].item(), rel=0.02, abs=0.05)
            assert len(entry) >= 3
    assert engine.stats().kv_blocks_used == 0
