"""Tensor parallelism over an fp8 KV cache (gloo, 2 processes on the CPU): each rank caches its own KV
heads in e4m3 with the layer's per-tensor scales (replicated: one value for all heads), so two ranks give
the greedy tokens of one, prefix-cache hits included."""

from __future__ import annotations

from pathlib import Path

import torch
from test_tensor_parallel import PROMPTS, SHARED, make_engine, run

from kiln.build.native import build_engine


def test_two_ranks_over_an_fp8_kv_cache_give_the_tokens_of_one(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    engine_dir = tmp_path / "fp8-kv"
    build_engine(
        tiny_gqa_dir, engine_dir, dtype="float32", kv_cache_dtype="fp8", calib_size=1, progress=False
    )
    one = make_engine(engine_dir, 1)
    assert one.config.kv_cache_dtype == "fp8"
    want, _ = run(one, PROMPTS)
    two = make_engine(engine_dir, 2)
    assert two.workers is not None and two.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    got, stats = run(two, PROMPTS)
    assert got == want and len(got) == len(PROMPTS)
    assert stats.prefix_cache_hits >= 2 * len(SHARED)
