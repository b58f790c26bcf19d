"""Engine behaviour on the tiny model: LLM API, seeds, stop strings, n > 1, abort, validation."""

from __future__ import annotations

import asyncio

import pytest

from kiln import LLM, SamplingParams
from kiln.clients.thread import AsyncEngine
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm(tiny_gqa_dir):
    return LLM(tiny_gqa_dir, device="cpu", block_size=4)


def test_llm_generate_shapes(llm):
    token_prompt = {"prompt_token_ids": llm.tokenizer.encode("hello world")}
    outs = llm.generate(["Once upon a time", token_prompt], SamplingParams(temperature=0, max_tokens=5))
    assert [o.prompt for o in outs] == ["Once upon a time", None]
    for out in outs:
        assert out.finished
        (completion,) = out.outputs
        assert len(completion.token_ids) <= 5
        assert completion.finish_reason in ("length", "stop")
        assert completion.text == llm.tokenizer.decode(completion.token_ids)
    assert outs[1].prompt_token_ids == token_prompt["prompt_token_ids"]


def test_llm_chat_continues_a_prefilled_answer(llm):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is"}]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.chat(messages, greedy, continue_final_message=True)
    assert llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False).endswith("Blue is")
    ids = llm.tokenizer.apply_chat_template(messages, False, continue_final_message=True)
    assert out.outputs[0].token_ids == llm.generate({"prompt_token_ids": ids}, greedy)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(messages, greedy, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match=r"^tokenize: not template variables"):
        llm.chat(messages[:1], greedy, chat_template_kwargs={"tokenize": False})


def test_allowed_token_ids_hold_every_sampled_token(llm):
    allowed = [40, 41, 42, llm.tokenizer.eos_token_ids[0]]
    params = SamplingParams(temperature=1.5, max_tokens=12, seed=4, allowed_token_ids=allowed, logprobs=1)
    (out,) = llm.generate(["Any text at all"], params)[0].outputs
    assert out.token_ids and set(out.token_ids) <= set(allowed)
    assert all(set(entry) <= set(allowed) for entry in out.logprobs)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    alone = llm.generate(["a seeded prompt"], params)[0].outputs[0].token_ids
    neighbours = SamplingParams(temperature=1.0, max_tokens=20)
    crowd = llm.generate(["other", "a seeded prompt", "more"], [neighbours, params, neighbours])
    assert crowd[1].outputs[0].token_ids == alone
    other_seed = llm.generate(["a seeded prompt"], SamplingParams(temperature=1.0, max_tokens=12, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone


def test_stop_string_spanning_tokens_is_cut_from_the_text(llm):
    base = llm.generate(["The stop test"], SamplingParams(temperature=0, max_tokens=24, min_tokens=24))[0]
    ids = base.outputs[0].token_ids
    # A stop string made of the tail of token 5 and the head of token 6 crosses a token boundary.
    left = llm.tokenizer.decode(ids[:6])
    right = llm.tokenizer.decode(ids[:7])
    assert len(right) > len(left) >= 2
    stop = left[-2:] + right[len(left) : len(left) + 1]
    expected = base.outputs[0].text[: base.outputs[0].text.index(stop)]
    got = llm.generate(["The stop test"], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert got.outputs[0].text == expected
    assert got.outputs[0].finish_reason == "stop"
    assert got.outputs[0].stop_reason == stop


def test_the_token_that_stops_a_request_is_left_out_of_its_text(llm):
    base = llm.generate(["The stop test"], SamplingParams(temperature=0, max_tokens=8, min_tokens=8))[0]
    ids = base.outputs[0].token_ids
    stopper = next(t for t in ids[2:] if llm.tokenizer.decode([t]).strip())  # a token with visible text
    cut = ids.index(stopper) + 1
    for include in (False, True):
        params = SamplingParams(
            temperature=0, max_tokens=8, stop_token_ids=[stopper], include_stop_str_in_output=include
        )
        (got,) = llm.generate(["The stop test"], params)[0].outputs
        assert got.token_ids == ids[:cut] and (got.finish_reason, got.stop_reason) == ("stop", stopper)
        assert got.text == llm.tokenizer.decode(ids[: cut if include else cut - 1])
    # EOS, forced first: its text ("<|im_end|>" when special tokens are kept) only on request.
    eos = llm.tokenizer.eos_token_ids[0]
    for include in (False, True):
        params = SamplingParams(
            max_tokens=4,
            logit_bias={eos: 100.0},
            skip_special_tokens=False,
            include_stop_str_in_output=include,
        )
        (got,) = llm.generate(["The stop test"], params)[0].outputs
        assert got.token_ids == [eos] and got.finish_reason == "stop"
        assert got.text == ("<|im_end|>" if include else "")


def test_n_samples_share_the_prompt_blocks(tiny_gqa_dir):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", block_size=4))
    prompt = list(range(5, 5 + 33))  # 8 full blocks + 1 token
    engine.add_request(
        "x", params=SamplingParams(n=4, temperature=1.0, max_tokens=3, seed=0), prompt_token_ids=prompt
    )
    finished = {}
    usage_with_all_four = []
    while engine.has_unfinished_requests():
        engine.step()
        if len(engine.scheduler.running) == 4:
            usage_with_all_four.append(engine.stats().kv_blocks_used)
        for out in engine.scheduler.running:
            finished.setdefault(out.request_id, out.num_cached_tokens)
    assert sorted(finished) == ["x#0", "x#1", "x#2", "x#3"]
    assert [finished[f"x#{i}"] for i in range(1, 4)] == [32, 32, 32]
    # Four sequences share the 8 full prompt blocks; each owns only its last, partial block.
    assert usage_with_all_four and set(usage_with_all_four) == {8 + 4}
    assert engine.stats().kv_blocks_used == 0


def test_n_outputs_are_indexed_and_seeded_siblings_differ(llm):
    out = llm.generate(["n test"], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [10**9]}, "out of range"),
        ({"prompt_token_ids": [1] * 5000}, "context"),
        ({"prompt_token_ids": [1, 2], "params": SamplingParams(max_tokens=5000)}, "exceeds the context"),
    ],
)
def test_bad_requests_are_refused_before_queueing(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(None, **kwargs)
    assert not llm.engine.has_unfinished_requests()


def test_async_abort_returns_every_block(tiny_gqa_dir):
    async def main():
        engine = AsyncEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", block_size=4))
        await engine.start()
        stream = engine.generate(list(range(3, 40)), SamplingParams(max_tokens=200, ignore_eos=True), "r1")
        got = [await anext(stream) for _ in range(3)]
        assert engine.stats().kv_blocks_used > 0
        await stream.aclose()  # the client went away
        assert engine.stats().kv_blocks_used == 0
        # At least one token each: a consumer that falls behind gets what queued up as one delta.
        assert all(o.outputs[0].token_ids for o in got)
        # The engine keeps serving afterwards.
        outs = [
            o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), "r2")
        ]
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 4
        await engine.shutdown()

    asyncio.run(main())


def test_async_concurrent_streams_complete(tiny_gqa_dir):
    async def one(engine, i):
        text, tokens = "", 0
        async for out in engine.generate(
            [3 + i, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True), f"c{i}"
        ):
            text += out.outputs[0].text
            tokens += len(out.outputs[0].token_ids)
        return tokens

    async def main():
        engine = AsyncEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
        counts = await asyncio.gather(*(one(engine, i) for i in range(16)))
        assert counts == [6] * 16
        assert engine.stats().kv_blocks_used == 0
        await engine.shutdown()

    asyncio.run(main())


def test_cancelled_twice_consumer_still_frees_its_request(tiny_gqa_dir):
    """Servers cancel a disconnected stream's task, sometimes again while it cleans up."""

    async def main():
        engine = AsyncEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", block_size=4))
        started = asyncio.Event()

        async def consume():
            params = SamplingParams(max_tokens=500, ignore_eos=True)
            async for _ in engine.generate(list(range(3, 40)), params, "c"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        await asyncio.sleep(0)  # let the cleanup start awaiting the abort ...
        task.cancel()  # ... and cancel it again there
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().kv_blocks_used == 0
        assert not engine._sinks
        await engine.shutdown()

    asyncio.run(main())


def test_a_slow_stream_gets_what_queued_up_as_one_delta(tiny_gqa_dir):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def consume(engine, request_id, pause):
        chunks = []
        async for out in engine.generate(list(range(3, 20)), params, request_id):
            chunks.append(out.outputs[0])
            await asyncio.sleep(pause)
        return chunks

    async def main():
        engine = AsyncEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
        fast = await consume(engine, "fast", 0)
        slow = await consume(engine, "slow", 0.05)
        await engine.shutdown()
        return fast, slow

    fast, slow = asyncio.run(main())
    assert sum(len(c.token_ids) for c in fast) == 40  # (a loaded machine may coalesce some of these too)
    assert len(slow) < 20 and max(len(c.token_ids) for c in slow) > 1
    assert [t for c in slow for t in c.token_ids] == [t for c in fast for t in c.token_ids]
    assert "".join(c.text for c in slow) == "".join(c.text for c in fast)
    assert slow[-1].finish_reason == "length" and all(c.finish_reason is None for c in slow[:-1])


def test_a_slow_stream_gets_its_tokens_before_the_engine_failure(tiny_gqa_dir, monkeypatch):
    async def main():
        engine = AsyncEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
        real_step, steps = engine.engine.step, []

        def failing_step():
            if len(steps) == 6:
                raise RuntimeError("device lost")
            steps.append(1)
            return real_step()

        monkeypatch.setattr(engine.engine, "step", failing_step)
        tokens = []
        with pytest.raises(Exception, match="device lost"):
            params = SamplingParams(max_tokens=40, ignore_eos=True)
            async for out in engine.generate(list(range(3, 20)), params, "r"):
                tokens += out.outputs[0].token_ids
                await asyncio.sleep(0.2)  # every output and the error queue up meanwhile
        await engine.shutdown()
        return tokens

    assert len(asyncio.run(main())) == 6  # six steps ran, each gave a token (CPU: steps one at a time)


def test_from_path_reports_its_start_up_phases(tiny_gqa_dir, caplog):
    with caplog.at_level("INFO", logger="kiln.engine.llm_engine"):
        engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(num_kv_blocks=16))
    # No CUDA graphs on CPU, and a Hugging Face dir has no engine kernels to seed.
    assert list(engine.startup_seconds) == ["weights", "tokenizer_wait", "kv_cache"]
    assert engine.graph_capture_seconds == {}  # no CUDA graphs on the CPU
    assert all(seconds >= 0 for seconds in engine.startup_seconds.values())
    assert "start-up seconds: weights" in caplog.text
