"""`prepare_process` seeds the global RNG and settles the garbage collector; building an engine does neither."""

from __future__ import annotations

import gc

import torch

from kiln.config import EngineConfig
from kiln.engine.gc_tuning import YOUNG_THRESHOLD, settle_garbage_collector
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.process_setup import prepare_process
from kiln.engine.sampling_params import SamplingParams


def test_thresholds_only_go_up_and_the_heap_is_frozen():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        settle_garbage_collector()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0
        gc.set_threshold(10 * YOUNG_THRESHOLD, 5, 5)
        settle_garbage_collector()
        assert gc.get_threshold() == (10 * YOUNG_THRESHOLD, 5, 5)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_building_an_engine_leaves_the_process_alone(tiny_gqa_dir):
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        torch.manual_seed(1234)
        rng = torch.get_rng_state()
        LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", seed=7))
        assert torch.equal(torch.get_rng_state(), rng)
        assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_prepare_process_seeds_the_global_rng_and_settles_the_collector():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        prepare_process(EngineConfig(seed=7))
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD and gc.get_freeze_count() > 0
        drawn = torch.rand(4)
        torch.manual_seed(7)
        assert torch.equal(drawn, torch.rand(4))
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_unseeded_requests_follow_the_configured_seed(tiny_gqa_dir):
    """Requests without their own seed draw from the global RNG that `prepare_process` seeded: the same
    seed gives the same text, as when the engine seeded it itself."""
    params = SamplingParams(temperature=1.0, max_tokens=8)

    def sample(seed: int) -> list[int]:
        engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", seed=seed))
        prepare_process(engine.config)
        engine.add_request("r", params=params, prompt_token_ids=[1, 2, 3])
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            tokens += [t for out in engine.step() for c in out.outputs for t in c.token_ids]
        return tokens

    saved = gc.get_threshold()
    try:
        assert sample(3) == sample(3)
        assert sample(3) != sample(4)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_opening_an_engine_to_serve_prepares_this_process_too(tiny_gqa_dir):
    """With the engine in a child process (which prepares its own), the front end's process is still
    prepared: its per-chunk garbage is what the settled collector keeps cheap."""
    import asyncio

    from kiln.cli import _open
    from kiln.clients.process import ProcessEngine

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        engine = _open(tiny_gqa_dir, EngineConfig(device="cpu", engine_process=True))
        assert isinstance(engine, ProcessEngine)
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD and gc.get_freeze_count() > 0
        asyncio.run(engine.shutdown())
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_torch_threads_fit_the_cores_this_process_may_use(monkeypatch):
    import os

    from kiln.engine import process_setup

    saved_threads, saved = torch.get_num_threads(), gc.get_threshold()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    try:
        prepare_process(EngineConfig())
        assert torch.get_num_threads() == 3  # one core left to the server's front end
        prepare_process(EngineConfig(), runs_engine=False)
        assert torch.get_num_threads() == 1  # a front end whose engine runs in a child process
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert process_setup.engine_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(5)
        prepare_process(EngineConfig())
        assert torch.get_num_threads() == 5  # the operator's choice stands
    finally:
        torch.set_num_threads(saved_threads)
        gc.unfreeze()
        gc.set_threshold(*saved)
