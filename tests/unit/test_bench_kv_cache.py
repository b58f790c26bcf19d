"""`kiln bench --random SHAPE --kv-cache-dtype fp8`: a random engine with an fp8 KV cache whose scales are
all 1.0 (no calibration text for random weights; the bench's JSON says so), on the CPU at a tiny shape."""

from __future__ import annotations

import pytest
import torch
from bench_cases import bench_latency_rows, greedy_tokens

from kiln.bench import cli, workload
from kiln.config import EngineConfig


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_random_engine_has_an_fp8_cache_with_unit_scales(tiny_shape: str, quantization: str | None) -> None:
    kv_cache = workload.random_kv_cache_config("fp8")
    quant = workload.random_quant_config(quantization)
    engine = workload.build_random_engine(
        tiny_shape, EngineConfig(device="cpu"), quant=quant, kv_cache=kv_cache
    )
    assert engine.config.kv_cache_dtype == "fp8"
    assert all(k.dtype == torch.float8_e4m3fn for k, _ in engine.runner.kv_caches)
    for layer in engine.runner.model.model.layers:
        assert torch.equal(layer.self_attn.k_scale, torch.ones(1)) and torch.equal(
            layer.self_attn.v_scale, torch.ones(1)
        )
    assert len(greedy_tokens(engine, [5, 9, 11], 3)) == 3
    assert workload.random_kv_cache_config("auto") is None and workload.random_kv_cache_config(None) is None


def test_kiln_bench_times_an_fp8_kv_cache_and_says_how_it_was_scaled(tiny_shape: str, tmp_path) -> None:
    rows = bench_latency_rows(tiny_shape, tmp_path, "--kv-cache-dtype", "fp8")
    assert {row["name"] for row in rows} == {"kiln/batch1_decode", "kiln/ttft"}
    for row in rows:
        assert row["shape"].startswith("tiny-test kv-fp8")
        assert row["params"]["kv_cache_dtype"] == "fp8"
        assert row["params"]["kv_cache_scales"] == workload.RANDOM_KV_SCALES
        assert row["params"]["kv_cache_scales"].startswith("1.0")


def test_the_kv_cache_flag_needs_a_random_engine(tiny_gqa_dir, capsys) -> None:
    assert cli.main([str(tiny_gqa_dir), "--kv-cache-dtype", "fp8"]) == 2
    assert "--random engines only" in capsys.readouterr().err
    assert cli.main(["--random", "llama2-7b", "--kv-cache-dtype", "fp16"]) == 2
    assert "unknown KV-cache dtype 'fp16'" in capsys.readouterr().err
