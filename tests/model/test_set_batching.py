"""`set_batching` on both native drivers: the scheduler's limits change at run time, within the ceilings the
engine was configured with, and a restarted ProcessEngine child gets them again."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from kiln.clients.process import ProcessEngine
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.engine.info import BatchingLimits
from kiln.engine.sampling_params import SamplingParams

OPTIONS = EngineConfig(device="cpu", block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
PROMPT_LEN, MAX_TOKENS = 40, 3


async def _run_load(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

    async def one(i: int) -> None:
        async for _ in engine.generate([7 + i] * PROMPT_LEN, params, f"r{i}"):
            pass

    await asyncio.gather(*(one(i) for i in range(4)))


async def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize("driver", ["thread", "process"])
def test_set_batching_changes_the_schedulers_limits_within_the_ceilings(tiny_gqa_dir, driver):
    async def main() -> None:
        if driver == "thread":
            engine = AsyncEngine.from_path(tiny_gqa_dir, OPTIONS)
        else:
            engine = ProcessEngine.from_path(tiny_gqa_dir, OPTIONS)
        try:
            stats = engine.stats()
            assert stats.batching == BatchingLimits(1, 64, 4)
            assert stats.batching_ceiling == BatchingLimits(None, 64, 4)

            await engine.set_batching(
                BatchingLimits(admission_interval=2, max_num_batched_tokens=16, max_num_seqs=2)
            )
            assert engine.stats().batching == BatchingLimits(2, 16, 2)  # in force once it returns
            if driver == "thread":
                config = engine.engine.scheduler.config
                assert (config.admission_interval, config.max_num_batched_tokens, config.max_num_seqs) == (
                    2,
                    16,
                    2,
                )

            before = engine.stats()
            await _run_load(engine)
            after = engine.stats()
            steps = after.num_steps - before.num_steps
            tokens = after.num_step_tokens - before.num_step_tokens
            # Every step within the new budget and cap: at most 16 tokens and 2 sequences each.
            assert steps >= math.ceil(tokens / 16)
            assert after.num_step_seqs - before.num_step_seqs <= 2 * steps
            # Two of the four waited while two ran: those steps count as backlog, with their prompt tokens.
            assert after.backlog_prefill_tokens > before.backlog_prefill_tokens
            assert (
                after.busy_seconds - before.busy_seconds >= after.backlog_seconds - before.backlog_seconds > 0
            )

            await engine.set_batching(BatchingLimits(max_num_batched_tokens=32))  # None: unchanged
            assert engine.stats().batching == BatchingLimits(2, 32, 2)

            for refused in (
                BatchingLimits(max_num_seqs=5),  # above what the engine was configured with
                BatchingLimits(max_num_batched_tokens=65),
                BatchingLimits(admission_interval=0),
            ):
                with pytest.raises(ValueError):
                    await engine.set_batching(refused)
            assert engine.stats().batching == BatchingLimits(2, 32, 2)

            if driver == "process":
                await engine.restart()  # a fresh child from the factory: configured limits, then these
                assert await _wait_for(lambda: engine.stats().batching == BatchingLimits(2, 32, 2))
                await _run_load(engine)
        finally:
            await engine.shutdown()

    asyncio.run(main())
