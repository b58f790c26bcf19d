"""The engine raises the young-generation GC threshold and freezes what exists once it is built."""

from __future__ import annotations

import gc

from kiln.engine.gc_tuning import YOUNG_THRESHOLD, settle_garbage_collector


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


def test_building_an_engine_settles_the_collector(tiny_gqa_dir):
    from kiln.config import EngineConfig
    from kiln.engine.llm_engine import LLMEngine

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_a_process_engine_settles_the_front_end_too(tiny_gqa_dir):
    import asyncio

    from kiln.clients.process import ProcessEngine
    from kiln.config import EngineConfig

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        engine = ProcessEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu"))
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        asyncio.run(engine.shutdown())
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
