"""A request whose own part of an engine step fails is aborted alone: the step runs again for the rest,
whose outputs are exactly what they would have been without it, and every KV block comes back."""

from __future__ import annotations

import asyncio

import pytest

import kiln.engine.model_runner as model_runner
from kiln.clients.messages import RequestFailedError
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.sampling_params import SamplingParams

POISON_SEED = 13
PROMPT = [5, 6, 7, 8]


def _run(
    engine: LLMEngine, poison: SamplingParams | None
) -> tuple[dict[str, list[int]], list[tuple[str, Exception]]]:
    for i in range(6):
        params = SamplingParams(temperature=0.8, seed=100 + i, max_tokens=12, ignore_eos=True)
        engine.add_request(f"r{i}", params=params, prompt_token_ids=PROMPT)
    if poison is not None:
        engine.add_request("poison", params=poison, prompt_token_ids=PROMPT)
    tokens: dict[str, list[int]] = {}
    failed: list[tuple[str, Exception]] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t for c in out.outputs for t in c.token_ids)
        failed += engine.take_failed()
    return tokens, failed


@pytest.fixture
def engine(tiny_gqa_dir) -> LLMEngine:
    return LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", num_kv_blocks=64))


def test_a_request_that_fails_to_prepare_is_dropped_and_the_step_runs_for_the_rest(engine, monkeypatch):
    reference, _ = _run(engine, None)
    real = model_runner.make_generator

    def make_generator(seed, device):
        if seed is not None and seed - POISON_SEED in (0, 1):  # both sequences of the n=2 request
            raise RuntimeError("Overflow when unpacking long")  # what torch said for a 2**64 seed
        return real(seed, device)

    monkeypatch.setattr(model_runner, "make_generator", make_generator)
    poison = SamplingParams(temperature=0.8, seed=POISON_SEED, n=2, max_tokens=12, ignore_eos=True)
    tokens, failed = _run(engine, poison)
    assert [(rid, str(exc)) for rid, exc in failed] == [("poison", "Overflow when unpacking long")]
    assert tokens == reference  # the neighbours' seeded samples are exactly as without the poison
    assert engine.kv_cache.stats().num_used_blocks == 0


def test_a_request_whose_output_fails_is_aborted_alone(engine, monkeypatch):
    reference, _ = _run(engine, None)
    real = OutputProcessor._advance

    def advance(self, seq, sampled):
        if seq.request.request_id == "poison" and seq.request.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer fault")
        return real(self, seq, sampled)

    monkeypatch.setattr(OutputProcessor, "_advance", advance)
    tokens, failed = _run(engine, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [rid for rid, _ in failed] == ["poison"] and isinstance(failed[0][1], UnicodeDecodeError)
    assert len(tokens["poison"]) == 2  # what it had before its fault
    assert {rid: t for rid, t in tokens.items() if rid != "poison"} == reference
    assert engine.kv_cache.stats().num_used_blocks == 0


def test_through_the_driver_only_the_poisoned_stream_fails(tiny_gqa_dir, monkeypatch):
    real = model_runner.make_generator

    def make_generator(seed, device):
        if seed == POISON_SEED:
            raise RuntimeError("boom")
        return real(seed, device)

    monkeypatch.setattr(model_runner, "make_generator", make_generator)

    async def collect(engine: AsyncEngine, request_id: str, seed: int) -> int | BaseException:
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=10, ignore_eos=True)
        try:
            return sum(
                [len(o.outputs[0].token_ids) async for o in engine.generate(PROMPT, params, request_id)]
            )
        except RequestFailedError as exc:
            return exc

    async def main() -> list[int | BaseException]:
        engine = AsyncEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", num_kv_blocks=64))
        try:
            return await asyncio.gather(
                *(collect(engine, f"r{i}", 100 + i) for i in range(6)), collect(engine, "poison", POISON_SEED)
            )
        finally:
            assert engine.stats().kv_blocks_used == 0
            await engine.shutdown()

    *neighbours, poisoned = asyncio.run(main())
    assert neighbours == [10] * 6
    assert isinstance(poisoned, RequestFailedError) and "boom" in str(poisoned)
