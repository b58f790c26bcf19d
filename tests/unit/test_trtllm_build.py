"""Kiln build flags -> TensorRT-LLM build plan, and the trtllm engine.json round trip (no tensorrt_llm needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.build.trtllm import canonical_quantization, plan_trtllm_build, trtllm_manifest_extra
from kiln.config import EngineLimits, ModelConfig
from kiln.engine_dir import EngineManifest
from kiln.errors import InvalidEngineError
from kiln.trtllm.compat import GpuInfo, build_environment, check_engine_compatible

LLAMA_7B = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    max_position_embeddings=4096,
    eos_token_ids=[2],
)


def plan(**overrides):
    kwargs = {
        "dtype": "fp16",
        "limits": EngineLimits(max_batch_size=32, max_num_tokens=4096, max_seq_len=2048),
    }
    kwargs.update(overrides)
    return plan_trtllm_build(LLAMA_7B, **kwargs)


def test_fp16_plan_has_the_fast_path_plugins_and_the_limits():
    p = plan()
    assert p.dtype == "float16" and p.tp_size == 1 and p.quant_algo is None and p.calib_config is None
    assert p.plugin_config == {
        "dtype": "float16",
        "gpt_attention_plugin": "float16",
        "gemm_plugin": "float16",
        "remove_input_padding": True,
        "paged_kv_cache": True,
        "tokens_per_block": 16,
        "context_fmha": True,
        "use_paged_context_fmha": True,
        "multiple_profiles": True,
    }
    assert p.build_config == {
        "max_batch_size": 32,
        "max_input_len": 2047,
        "max_seq_len": 2048,
        "max_num_tokens": 4096,
        "max_beam_width": 1,
        "gather_context_logits": False,
    }
    assert p.llm_kwargs == {"enable_chunked_prefill": True} and p.gather_generation_logits is False


def test_bf16_and_fp32_gemm_plugin():
    assert plan(dtype="bf16").plugin_config["gemm_plugin"] == "bfloat16"
    fp32 = plan(dtype="float32")
    assert (
        fp32.plugin_config["gemm_plugin"] is None and fp32.plugin_config["gpt_attention_plugin"] == "float32"
    )


def test_max_seq_len_defaults_to_the_model_and_max_input_len_can_be_set():
    p = plan(limits=EngineLimits(max_seq_len=None), max_input_len=1024, multiple_profiles=False)
    assert p.build_config["max_seq_len"] == 4096 and p.build_config["max_input_len"] == 1024
    assert p.plugin_config["multiple_profiles"] is False
    with pytest.raises(ValueError, match="max_input_len"):
        plan(max_input_len=2048)


def test_int8_weight_only_needs_no_calibration():
    p = plan(quantization="w8a16")
    assert p.quantization == "int8_wo" and p.quant_algo == "W8A16" and p.calib_config is None
    with pytest.raises(ValueError, match="calib_dataset only applies"):
        plan(quantization="int8_wo", calib_dataset="my.jsonl")


def test_fp8_and_smoothquant_calibrate():
    fp8 = plan(quantization="fp8", calib_dataset="/data/calib.jsonl", calib_size=64)
    assert fp8.quant_algo == "FP8"
    assert fp8.calib_config == {
        "calib_dataset": "/data/calib.jsonl",
        "calib_batches": 64,
        "calib_batch_size": 1,
        "calib_max_seq_length": 512,
    }
    sq = plan(quantization="smoothquant", limits=EngineLimits(max_seq_len=256))
    assert sq.quantization == "int8_sq" and sq.quant_algo == "W8A8_SQ_PER_CHANNEL"
    assert (
        sq.calib_config["calib_dataset"] == "cnn_dailymail" and sq.calib_config["calib_max_seq_length"] == 256
    )
    with pytest.raises(ValueError, match="fp8 quantization needs a float16 or bfloat16"):
        plan(quantization="fp8", dtype="float32")


def test_unknown_quantization_and_bad_layouts_are_refused():
    assert canonical_quantization(None) is None and canonical_quantization("none") is None
    with pytest.raises(ValueError, match="unknown TensorRT-LLM quantization 'int4'"):
        plan(quantization="int4")
    with pytest.raises(ValueError, match="tp_size 3"):
        plan(tp_size=3)
    with pytest.raises(ValueError, match="power of two"):
        plan(limits=EngineLimits(block_size=24))
    assert plan(tp_size=4).tp_size == 4


def test_gather_logits_is_recorded_for_the_runtime():
    assert plan(gather_logits=True).gather_generation_logits is True


def test_manifest_round_trip_keeps_the_trtllm_extra(tmp_path: Path):
    p = plan(quantization="int8_wo")
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 2)
    extra = trtllm_manifest_extra(p, build_environment(h100, "1.2.0", tp_size=1))
    (tmp_path / "trtllm").mkdir()
    (tmp_path / "trtllm" / "rank0.engine").write_bytes(b"engine")
    (tmp_path / "tokenizer.json").write_text("{}")
    manifest = EngineManifest(
        backend="trtllm",
        model=LLAMA_7B,
        dtype=p.dtype,
        weight_files={"trtllm/rank0.engine": "0" * 64},
        limits=EngineLimits(max_batch_size=32, max_num_tokens=4096, max_seq_len=2048),
        tokenizer_files=["tokenizer.json"],
        file_sizes={"trtllm/rank0.engine": 6, "tokenizer.json": 2},
        served_model_name="llama-7b",
        quantization=p.quantization,
        extra=extra,
    )
    manifest.save(tmp_path)
    loaded = EngineManifest.load(tmp_path)
    assert loaded == manifest
    assert json.loads((tmp_path / "engine.json").read_text())["extra"]["tensorrt_llm_version"] == "1.2.0"
    assert loaded.extra["build_config"]["max_seq_len"] == 2048 and loaded.extra["quant_algo"] == "W8A16"
    assert loaded.extra["engine_subdir"] == "trtllm" and loaded.extra["compute_capability"] == "9.0"
    check_engine_compatible(loaded.extra, runtime_version="1.2.0", gpu=h100)
    with pytest.raises(InvalidEngineError, match=r"1\.2\.1"):
        check_engine_compatible(loaded.extra, runtime_version="1.2.1", gpu=h100)
