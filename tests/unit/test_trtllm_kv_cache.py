"""`kiln build --backend trtllm --kv-cache-dtype fp8`: TensorRT-LLM's FP8 KV cache (QuantConfig's
kv_cache_quant_algo), planned and passed to a stand-in of tensorrt_llm 1.2's API (the library itself
runs only in the NGC container, tests/trtllm)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import kiln.cli
from kiln.build import trtllm as trtllm_build
from kiln.build.trtllm import plan_trtllm_build, quant_config_kwargs
from kiln.config import EngineLimits, ModelConfig
from kiln.engine_dir import EngineManifest
from kiln.trtllm import compat

runner = CliRunner()
LLAMA = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
)


def plan(**overrides: Any) -> trtllm_build.TrtLlmBuildPlan:
    kwargs: dict[str, Any] = {"dtype": "bf16", "limits": EngineLimits(max_seq_len=2048)}
    return plan_trtllm_build(LLAMA, **(kwargs | overrides))


def test_fp8_kv_cache_is_tensorrt_llms_kv_cache_quant_algo_and_calibrates() -> None:
    alone = plan(kv_cache_dtype="fp8")
    assert (alone.quant_algo, alone.kv_cache_quant_algo, alone.kv_cache_dtype) == (None, "FP8", "fp8")
    assert alone.calib_config is not None and alone.calib_config["calib_dataset"] == "cnn_dailymail"
    assert quant_config_kwargs(alone) == {"kv_cache_quant_algo": "FP8"}
    both = plan(quantization="int8-wo", kv_cache_dtype="fp8", calib_dataset="/data/c.jsonl", calib_size=16)
    assert quant_config_kwargs(both) == {"quant_algo": "W8A16", "kv_cache_quant_algo": "FP8"}
    assert both.calib_config["calib_dataset"] == "/data/c.jsonl" and both.calib_config["calib_batches"] == 16
    auto = plan()
    assert (
        auto.kv_cache_quant_algo is None and auto.kv_cache_dtype == "auto" and quant_config_kwargs(auto) == {}
    )
    assert quant_config_kwargs(plan(quantization="fp8")) == {"quant_algo": "FP8"}


def test_bad_kv_cache_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown KV-cache dtype 'int8'"):
        plan(kv_cache_dtype="int8")
    with pytest.raises(
        ValueError, match=r"fp8 KV cache \(--kv-cache-dtype fp8\) needs a float16 or bfloat16"
    ):
        plan(kv_cache_dtype="fp8", dtype="float32")
    with pytest.raises(ValueError, match="calib_dataset only applies"):
        plan(calib_dataset="my.jsonl")  # nothing calibrated without fp8 weights or an fp8 KV cache


def _fake_tensorrt_llm(monkeypatch: pytest.MonkeyPatch, sm: tuple[int, int]) -> dict[str, Any]:
    """tensorrt_llm 1.2's build surface, recording what Kiln hands it."""
    seen: dict[str, Any] = {}

    class Recorded:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self.plugin_config = types.SimpleNamespace(**{k: None for k in plan().plugin_config})

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            seen["llm"] = kwargs

        def save(self, path: str) -> None:
            Path(path).mkdir(parents=True)
            (Path(path) / "rank0.engine").write_bytes(b"engine")

        def shutdown(self) -> None:
            pass

    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.BuildConfig = llmapi.CalibConfig = llmapi.KvCacheConfig = llmapi.QuantConfig = Recorded
    llmapi.QuantAlgo = types.SimpleNamespace(FP8="QuantAlgo.FP8", W8A16="QuantAlgo.W8A16")
    package = types.ModuleType("tensorrt_llm")
    package.__version__ = "1.2.0"
    package.llmapi = llmapi
    monkeypatch.setitem(sys.modules, "tensorrt_llm", package)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setattr(compat, "import_tensorrt_llm", lambda: package)
    monkeypatch.setattr(compat, "import_trt_engine_llm", lambda: LLM)
    monkeypatch.setattr(compat, "probe_gpu", lambda: compat.GpuInfo("NVIDIA Test GPU", sm, 1))
    return seen


def test_the_build_hands_tensorrt_llm_the_fp8_kv_cache_and_records_it(
    tiny_gqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_tensorrt_llm(monkeypatch, (9, 0))
    out = tmp_path / "e"
    manifest = trtllm_build.build_trtllm_engine(
        tiny_gqa_dir, out, dtype="bfloat16", quantization="int8-wo", kv_cache_dtype="fp8", calib_size=4
    )
    quant = seen["llm"]["quant_config"].kwargs
    assert quant == {"quant_algo": "QuantAlgo.W8A16", "kv_cache_quant_algo": "QuantAlgo.FP8"}
    assert seen["llm"]["calib_config"].kwargs["calib_batches"] == 4
    loaded = EngineManifest.load(out)
    assert loaded == manifest and loaded.kv_cache_dtype == "fp8" and loaded.kv_cache_config is None
    assert loaded.extra["kv_cache_quant_algo"] == "FP8" and loaded.quantization == "int8_wo"
    # without the flag: no QuantConfig at all, an "auto" cache
    seen.clear()
    plain = trtllm_build.build_trtllm_engine(tiny_gqa_dir, tmp_path / "p", dtype="bfloat16")
    assert "quant_config" not in seen["llm"] and plain.kv_cache_dtype == "auto"


def test_the_build_refuses_an_fp8_kv_cache_before_ada(
    tiny_gqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_tensorrt_llm(monkeypatch, (8, 0))
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8 needs compute capability >= 8\.9"):
        trtllm_build.build_trtllm_engine(tiny_gqa_dir, tmp_path / "e", dtype="float16", kv_cache_dtype="fp8")
    assert "llm" not in seen and not (tmp_path / "e").exists()


def test_kiln_build_passes_the_flag_to_the_trtllm_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_build(checkpoint: str, output_dir: Path, **kwargs: Any) -> Any:
        seen.update(kwargs)
        fields = {"served_model_name": "m", "backend": "trtllm", "dtype": "bfloat16", "quantization": None}
        return type("Manifest", (), {**fields, "kv_cache_dtype": "fp8"})()

    monkeypatch.setattr(trtllm_build, "build_trtllm_engine", fake_build)
    args = ["build", "org/model", "-o", str(tmp_path / "e"), "--backend", "trtllm", "--kv-cache-dtype", "fp8"]
    result = runner.invoke(kiln.cli.app, [*args, "--calib-size", "8"])
    assert result.exit_code == 0, result.output
    assert seen["kv_cache_dtype"] == "fp8" and seen["calib_size"] == 8
    assert "trtllm, bfloat16, KV cache fp8" in result.output
