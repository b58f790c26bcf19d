"""ProcessEngine: the native engine in a child process gives the same tokens and keeps the same rules."""

from __future__ import annotations

import asyncio
import functools

import pytest

from kiln.clients.messages import EngineDeadError
from kiln.clients.open import open_engine
from kiln.clients.process import ProcessEngine
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.engine.outputs import accumulate
from kiln.engine.sampling_params import SamplingParams

OPTIONS = EngineConfig(device="cpu", block_size=4)
PROMPTS = [[5, 6, 7], list(range(3, 40)), [100, 7, 9, 250, 11]]


async def _tokens(engine, prompt: list[int], rid: str, params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params, rid):
        tokens.extend(out.outputs[0].token_ids)
    return tokens


def _run_all(engine) -> list[list[int]]:
    async def main():
        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=3)
        try:
            return await asyncio.gather(
                *(_tokens(engine, p, f"g{i}", greedy) for i, p in enumerate(PROMPTS)),
                _tokens(engine, PROMPTS[1], "s", seeded),
            )
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def process_engine(tiny_gqa_dir):
    engine = ProcessEngine.from_path(tiny_gqa_dir, OPTIONS)
    yield engine
    asyncio.run(engine.shutdown())


def test_same_tokens_as_the_in_process_engine(tiny_gqa_dir):
    expected = _run_all(AsyncEngine.from_path(tiny_gqa_dir, OPTIONS))
    assert _run_all(ProcessEngine.from_path(tiny_gqa_dir, OPTIONS)) == expected


def test_abort_frees_blocks_in_the_child_and_bad_requests_fail_in_the_parent(process_engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await anext(process_engine.generate([], SamplingParams(), "bad"))
        stream = process_engine.generate(
            list(range(3, 40)), SamplingParams(max_tokens=300, ignore_eos=True), "r"
        )
        for _ in range(3):
            await anext(stream)
        assert process_engine.stats().kv_blocks_used > 0
        await stream.aclose()  # the abort returns once the child has freed the blocks
        assert process_engine.stats().kv_blocks_used == 0
        assert process_engine.model_info.backend == "native"
        assert process_engine.tokenizer.decode([5, 6]) != ""

    asyncio.run(main())


def _failing_factory():
    raise RuntimeError("no weights here")


def test_a_child_that_cannot_load_reports_why():
    with pytest.raises(RuntimeError, match="no weights here"):
        ProcessEngine(_failing_factory)


def test_shutdown_ends_open_streams(tiny_gqa_dir):
    async def main():
        engine = ProcessEngine.from_path(tiny_gqa_dir, OPTIONS)
        stream = engine.generate([5, 6], SamplingParams(max_tokens=10_00, ignore_eos=True), "long")
        await anext(stream)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not engine._process.is_alive()

    asyncio.run(main())


def test_open_engine_picks_the_process_engine_when_asked(tiny_gqa_dir):
    engine = open_engine(tiny_gqa_dir, EngineConfig(device="cpu", engine_process=True))
    try:
        assert isinstance(engine, ProcessEngine)
    finally:
        asyncio.run(engine.shutdown())
    assert isinstance(
        open_engine(tiny_gqa_dir, EngineConfig(device="cpu", engine_process=False)), AsyncEngine
    )


def test_concurrent_streams_and_a_refused_add_do_not_disturb_each_other(process_engine):
    async def main():
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        counts = await asyncio.gather(
            *(_count(process_engine, [3 + i, 4, 5], f"c{i}", params) for i in range(16))
        )
        assert counts == [6] * 16
        # A duplicate of an open request id is refused before it reaches the child; the rest goes on.
        first = process_engine.generate([5, 6], SamplingParams(max_tokens=50, ignore_eos=True), "dup")
        await anext(first)
        with pytest.raises(ValueError, match="already"):
            async for _ in _dup(process_engine):
                pass
        await first.aclose()
        assert process_engine.stats().kv_blocks_used == 0

    asyncio.run(main())


async def _count(engine, prompt, rid, params) -> int:
    return len(await _tokens(engine, prompt, rid, params))


async def _dup(engine):
    # Same request id as the stream still open: the parent's RequestStreams refuse it.
    async for out in engine.generate([7, 8], SamplingParams(max_tokens=2), "dup"):
        yield out


def test_outputs_cross_the_process_boundary_whole(tiny_gqa_dir):
    """Text, logprobs, n > 1, finish reasons and the prompt (restored in the parent) as in-process.
    How deltas group into outputs depends on timing (a consumer that lags gets them merged), so the
    whole of each completion is compared."""

    def collect(engine):
        async def main():
            params = SamplingParams(temperature=0.7, max_tokens=6, seed=5, n=2, logprobs=2, ignore_eos=True)
            outs = [o async for o in engine.generate(PROMPTS[2], params, "w", prompt="some text")]
            await engine.shutdown()
            assert all((o.prompt, o.prompt_token_ids) == ("some text", PROMPTS[2]) for o in outs)
            assert all(o.metrics is not None for o in outs) and outs[-1].finished
            total = functools.reduce(accumulate, outs, None)
            return [
                (c.index, c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason)
                for c in total.outputs
            ]

        return asyncio.run(main())

    expected = collect(AsyncEngine.from_path(tiny_gqa_dir, OPTIONS))
    assert len(expected) == 2 and all(len(c[2]) == 6 and len(c[3]) == 6 for c in expected)
    assert collect(ProcessEngine.from_path(tiny_gqa_dir, OPTIONS)) == expected
