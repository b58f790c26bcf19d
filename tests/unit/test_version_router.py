"""VersionRouter: exact canary shares, owners pinned to one version, canary failures retried on stable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kiln.clients.messages import EngineDeadError, RequestFailedError
from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.serve.versions import ServedVersion, VersionRouter, version_of


class FakeEngine:
    """Answers every request with its own name as two tokens; `fail` makes it fail before any output."""

    def __init__(self, name: str, *, fail: type[Exception] | None = None, dead: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.dead = dead
        self.seen: list[str] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.shut = False

    @property
    def tokenizer(self) -> str:
        return f"tokenizer-{self.name}"

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self.name, backend="fake", max_model_len=64, dtype="float32")

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **_: object
    ) -> AsyncIterator[RequestOutput]:
        self.seen.append(request_id)
        try:
            if self.fail is not None:
                raise self.fail(f"{self.name} failed")
            for i, last in ((0, False), (1, True)):
                await asyncio.sleep(0)
                out = CompletionOutput(
                    index=0, text=self.name, token_ids=[i], finish_reason="stop" if last else None
                )
                yield RequestOutput(request_id, None, prompt_token_ids, [out], finished=last)
        finally:
            self.closed.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=1, num_steps=10)

    async def check_health(self, timeout: float) -> None:
        if self.dead:
            raise EngineDeadError(f"{self.name} died")

    async def start(self) -> None: ...

    async def shutdown(self) -> None:
        self.shut = True


def _router(canary: FakeEngine | None = None, share: float = 0.0) -> VersionRouter:
    router = VersionRouter(ServedVersion(1, Path("1"), FakeEngine("v1")), model_name="model")
    if canary is not None:
        router.set_canary(ServedVersion(2, Path("2"), canary), share)
    return router


async def _text(router: VersionRouter, request_id: str, owner: str | None = None) -> str:
    return "".join(
        [o.outputs[0].text async for o in router.generate([1, 2], SamplingParams(), request_id, owner=owner)]
    )


def test_share_is_dealt_exactly_and_an_owner_stays_on_its_version() -> None:
    async def main() -> list[str]:
        router = _router(FakeEngine("v2"), 0.25)
        return [await _text(router, f"r{i}") for i in range(12)]

    texts = asyncio.run(main())
    assert texts == ["v1v1", "v1v1", "v1v1", "v2v2"] * 3  # every fourth new request


def test_route_is_known_as_soon_as_generate_is_called_and_prompts_of_one_owner_share_it() -> None:
    async def main() -> None:
        router = _router(FakeEngine("v2"), 0.5)
        first = router.generate([1], SamplingParams(), "a-0", owner="a")
        assert version_of(router, "a") == 1  # credit 0.5: stable
        second = router.generate([1], SamplingParams(), "a-1", owner="a")  # same owner: same version
        other = router.generate([1], SamplingParams(), "b", owner="b")  # credit reaches 1: canary
        assert version_of(router, "b") == 2
        texts = []
        for stream in (first, second, other):
            texts.append([o.outputs[0].text async for o in stream])
        assert texts == [["v1", "v1"], ["v1", "v1"], ["v2", "v2"]]
        assert version_of(router, "a") is None  # released once its requests ended

    asyncio.run(main())


@pytest.mark.parametrize("error", [RequestFailedError, EngineDeadError])
def test_a_canary_failure_before_output_is_run_again_on_stable(error: type[Exception]) -> None:
    async def main() -> tuple[VersionRouter, str]:
        router = _router(FakeEngine("v2", fail=error), 0.99)
        await _text(router, "r0")  # credit 0.99: stable
        return router, await _text(router, "r1")  # canary fails, stable answers

    router, text = asyncio.run(main())
    assert text == "v1v1"
    canary = router.canary
    assert canary is not None
    assert (canary.window.requests, canary.window.errors, canary.failed) == (1, 1, 1)
    assert (router.stable.window.requests, router.stable.window.errors) == (1, 0)


def test_a_stable_failure_reaches_the_caller() -> None:
    async def main() -> None:
        router = VersionRouter(ServedVersion(1, Path("1"), FakeEngine("v1", fail=RequestFailedError)))
        await _text(router, "r0")

    with pytest.raises(RequestFailedError):
        asyncio.run(main())


def test_refusals_do_not_count_against_a_version() -> None:
    async def main() -> VersionRouter:
        router = _router(FakeEngine("v2", fail=ValueError), 1 - 1e-12)
        with pytest.raises(ValueError):
            await _text(router, "r0")
        return router

    router = asyncio.run(main())
    assert router.canary is not None and router.canary.window.requests == 0


def test_closing_a_stream_early_closes_the_engine_stream_and_drains_the_version() -> None:
    async def main() -> tuple[VersionRouter, FakeEngine]:
        router = _router()
        engine = router.stable.engine
        stream = router.generate([1], SamplingParams(), "r0")
        await anext(stream)
        assert router.stable.in_flight == 1
        await stream.aclose()
        return router, engine  # type: ignore[return-value]

    router, engine = asyncio.run(main())
    assert engine.closed == ["r0"] and router.drained(router.stable)


def test_promote_retires_the_old_stable_and_abort_reaches_the_right_engine() -> None:
    async def main() -> None:
        v2 = FakeEngine("v2")
        router = _router(v2, 0.5)
        v1 = router.stable.engine
        await router.abort("unknown")  # known to no version: asked of every live one
        assert v1.aborted == ["unknown"] and v2.aborted == ["unknown"]  # type: ignore[attr-defined]
        old = router.promote()
        assert (old.number, old.role, router.stable.number, router.canary) == (1, "retiring", 2, None)
        assert [v.number for v in router.live] == [2, 1]
        stream = router.generate([1], SamplingParams(), "r9")
        await anext(stream)
        await router.abort("r9")
        assert v2.aborted[-1] == "r9" and v1.aborted == ["unknown"]  # type: ignore[attr-defined]
        await stream.aclose()
        router.forget(old)
        assert [v.number for v in router.live] == [2]

    asyncio.run(main())


def test_health_stats_and_name() -> None:
    down: list[str] = []

    async def main() -> VersionRouter:
        router = _router(FakeEngine("v2", dead=True), 0.1)
        router.on_canary_down = down.append
        await router.check_health(1.0)  # the canary's death is not the server's
        return router

    router = asyncio.run(main())
    assert down == ["v2 died"]
    assert router.model_info.name == "model" and router.tokenizer == "tokenizer-v1"
    assert (router.stats().num_running, router.stats().num_steps) == (2, 20)


def test_batching_limits_reach_every_version_and_a_new_canary() -> None:
    from kiln.engine.info import BatchingLimits

    class Tunable(FakeEngine):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.limits: list[BatchingLimits] = []

        async def set_batching(self, limits: BatchingLimits) -> None:
            self.limits.append(limits)

    async def main() -> tuple[Tunable, Tunable, Tunable]:
        v1, v2, v3 = Tunable("v1"), Tunable("v2"), Tunable("v3")
        router = VersionRouter(ServedVersion(1, Path("1"), v1))
        router.set_canary(ServedVersion(2, Path("2"), v2), 0.5)
        assert router.can_set_batching
        await router.set_batching(BatchingLimits(admission_interval=3))
        router.withdraw_canary()
        canary = ServedVersion(3, Path("3"), v3)
        await router.apply_batching(canary)  # the rollout does this before the canary's first request
        return v1, v2, v3

    v1, v2, v3 = asyncio.run(main())
    assert [len(v.limits) for v in (v1, v2, v3)] == [1, 1, 1]
    assert v3.limits[0].admission_interval == 3


def test_no_latency_samples_are_kept_without_a_canary() -> None:
    async def main() -> VersionRouter:
        router = _router()
        for i in range(5):
            await _text(router, f"r{i}")
        return router

    window = asyncio.run(main()).stable.window
    assert (window.requests, window.ttft, window.itl) == (5, [], [])
