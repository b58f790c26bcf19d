"""`kiln bench --random SHAPE --quantization SCHEME`: random weights quantized as a build would, on the CPU at
a tiny shape (the references run there), so the plumbing is checked before it costs GPU time."""

from __future__ import annotations

import pytest
import torch
from bench_cases import bench_latency_rows, greedy_tokens

from kiln.bench import cli, workload
from kiln.config import EngineConfig
from kiln.kernels import quant_reference
from kiln.models.quant_linear import QuantizedLinear


def test_quant_config_from_the_flags() -> None:
    assert workload.random_quant_config(None) is None
    assert workload.random_quant_config("int8-wo").scheme == "int8_wo"
    assert workload.random_quant_config("int8-wo", 32).group_size == 32
    assert workload.random_quant_config("w8a8").smoothquant_alpha is not None
    with pytest.raises(ValueError, match="needs --quantization int8-wo"):
        workload.random_quant_config(None, 32)
    with pytest.raises(ValueError, match="group size applies to int8_wo only"):
        workload.random_quant_config("fp8", 32)
    with pytest.raises(ValueError, match="unknown quantization"):
        workload.random_quant_config("int4")


@pytest.mark.parametrize(
    ("scheme", "group"), [("int8-wo", None), ("int8-wo", 16), ("fp8", None), ("int8-sq", None)]
)
def test_random_engine_is_quantized_and_generates(tiny_shape: str, scheme: str, group: int | None) -> None:
    quant = workload.random_quant_config(scheme, group)
    engine = workload.build_random_engine(tiny_shape, EngineConfig(device="cpu"), quant=quant)
    layer = engine.runner.model.model.layers[1]
    down = layer.mlp.down_proj
    assert isinstance(down, QuantizedLinear) and down.scheme == quant.scheme
    assert down.weight.dtype == (quant_reference.FP8_DTYPE if scheme == "fp8" else torch.int8)
    assert down.weight_scale.shape == ((64,) if group is None else (64, 128 // group))
    if scheme == "int8-sq":  # no calibration for random weights: unit smoothing
        assert torch.equal(down.smooth_scale, torch.ones(128))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(64))
    else:
        assert down.smooth_scale is None
    assert len(greedy_tokens(engine, [5, 9, 11], 3)) == 3


def test_kiln_bench_runs_a_quantized_random_engine(tiny_shape: str, tmp_path) -> None:
    rows = bench_latency_rows(tiny_shape, tmp_path, "--quantization", "fp8")
    assert {row["name"] for row in rows} == {"kiln/batch1_decode", "kiln/ttft"}
    assert all(
        row["params"]["quantization"] == "fp8" and row["shape"].startswith("tiny-test fp8") for row in rows
    )


def test_quantization_flags_need_a_random_engine(tiny_gqa_dir, capsys) -> None:
    assert cli.main([str(tiny_gqa_dir), "--quantization", "fp8"]) == 2
    assert "--random engines only" in capsys.readouterr().err
    assert cli.main(["--url", "http://127.0.0.1:1", "--quant-group-size", "64"]) == 2
    assert cli.main(["--random", "llama2-7b", "--quant-group-size", "64"]) == 2  # no --quantization
    assert "needs --quantization int8-wo" in capsys.readouterr().err
