"""A client's request of many sequences never delays another client's short one by more than a step or
two: the short one's first token comes within two steps of its arrival, and both finish whole."""

from __future__ import annotations

from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams


def test_a_huge_request_delays_a_short_one_by_a_step_or_two(tiny_gqa_dir):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", max_num_seqs=8, num_kv_blocks=256))
    big = SamplingParams(temperature=0.0, n=4, max_tokens=40, ignore_eos=True)
    for i in range(8):  # one client: 8 prompts x n=4 = 32 sequences, four times the engine's slots
        engine.add_request(f"big-{i}", params=big, prompt_token_ids=[5, 6, 7, i + 10], owner="big")
    tokens: dict[str, int] = {}

    def step() -> list[str]:
        outputs = engine.step()
        for out in outputs:
            tokens[out.request_id] = tokens.get(out.request_id, 0) + sum(
                len(c.token_ids) for c in out.outputs
            )
        return [out.request_id for out in outputs]

    for _ in range(5):
        step()
    engine.add_request(
        "small", params=SamplingParams(temperature=0.0, max_tokens=4), prompt_token_ids=[9, 9], owner="small"
    )
    steps = 1
    while "small" not in step():
        steps += 1
    assert steps <= 2, f"the short request waited {steps} steps for its first token"
    while engine.has_unfinished_requests():
        step()
    assert tokens["small"] == 4 and all(tokens[f"big-{i}"] == 4 * 40 for i in range(8))
    assert engine.kv_cache.stats().num_used_blocks == 0
