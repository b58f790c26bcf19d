"""Pre-quantized FP8 checkpoints in NVIDIA ModelOpt's Hugging Face layout, built natively (kiln.build.modelopt).

The fixture writes the tiny random Llama as ModelOpt exports it: every decoder linear's weight in e4m3 with
its scale (`FP8`: one per tensor, as a scalar, plus a static `input_scale`; `FP8_PER_CHANNEL_PER_TOKEN`:
one per row), lm_head excluded, and with `kv_cache_quant_algo` FP8 the k/v scales. The engine must hold
those very e4m3 bytes, each scale on its own rows, and say in engine.json what it dropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.build import build_engine
from kiln.errors import CheckpointError
from kiln.models.loader import load_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP8 = torch.float8_e4m3fn


def write_modelopt(
    src: Path, dst: Path, algo: str = "FP8", kv: bool = True, in_config: bool = False, **quantization: object
) -> Path:
    """The tiny checkpoint `src` as a ModelOpt FP8 export in `dst` (hf_quant_config.json, or config.json's
    quantization_config with `in_config`)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    stored = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and any(f".{lin}." in name for lin in LINEARS):
            per_channel = algo == "FP8_PER_CHANNEL_PER_TOKEN"
            amax = t.float().abs().amax(dim=1) if per_channel else t.float().abs().amax()
            scale = amax / 448
            stored[name] = (t.float() / (scale[:, None] if per_channel else scale)).clamp(-448, 448).to(FP8)
            stored[base + ".weight_scale"] = scale.reshape(-1, 1) if per_channel else scale.reshape(())
            if not per_channel:
                stored[base + ".input_scale"] = torch.tensor(0.02)
            if kv and name.endswith(("k_proj.weight", "v_proj.weight")):
                stored[base + (".k_scale" if "k_proj" in name else ".v_scale")] = torch.tensor(0.05)
        else:
            stored[name] = t.bfloat16()
    save_file(stored, str(dst / "model.safetensors"))
    spec = {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv else None, "exclude_modules": ["lm_head"]}
    spec |= quantization
    hf = json.loads((src / "config.json").read_text())
    hf.pop("dtype", None)
    hf["torch_dtype"] = "bfloat16"
    if in_config:
        hf["quantization_config"] = {"quant_method": "modelopt", **spec}
    else:
        (dst / "hf_quant_config.json").write_text(
            json.dumps({"producer": {"name": "modelopt"}, "quantization": spec})
        )
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


@pytest.mark.parametrize("in_config", [False, True], ids=["hf_quant_config", "config.json"])
def test_a_per_tensor_export_keeps_its_bytes_and_says_what_it_dropped(
    tiny_gqa_dir: Path, tmp_path: Path, in_config: bool
) -> None:
    ckpt = write_modelopt(tiny_gqa_dir, tmp_path / "modelopt", in_config=in_config)
    manifest = build_engine(ckpt, tmp_path / "engine", progress=False)
    record = manifest.quant_config.prequantized
    assert manifest.quantization == "fp8" and manifest.dtype == "bfloat16"
    assert record["source"] == "pre-quantized (NVIDIA ModelOpt)" and record["format"] == "FP8"
    assert record["weight_strategy"] == "tensor" and "dropped" in record["checkpoint_activations"]
    assert "--kv-cache-dtype fp8" in record["checkpoint_kv_cache"]
    stored = load_file(str(ckpt / "model.safetensors"))
    params = dict(load_model(tmp_path / "engine", device="cpu")[0].named_parameters())
    p = "model.layers.1."
    parts = [stored[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
    scales = torch.cat(
        [
            stored[f"{p}self_attn.{x}_proj.weight_scale"].expand(len(w))
            for x, w in zip("qkv", parts, strict=True)
        ]
    )
    assert len(set(scales.tolist())) == 3  # q, k and v each keep their own scale, on their own rows
    assert torch.equal(
        params[f"{p}self_attn.qkv_proj.weight"].view(torch.uint8), torch.cat(parts).view(torch.uint8)
    )
    assert torch.equal(params[f"{p}self_attn.qkv_proj.weight_scale"], scales)
    assert params["lm_head.weight"].dtype == torch.bfloat16  # excluded: 16 bits, as stored


def test_a_per_channel_per_token_export_builds(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    ckpt = write_modelopt(tiny_gqa_dir, tmp_path / "pcpt", algo="FP8_PER_CHANNEL_PER_TOKEN", kv=False)
    manifest = build_engine(ckpt, tmp_path / "engine", progress=False)
    record = manifest.quant_config.prequantized
    assert (
        record["weight_strategy"] == "channel" and record["checkpoint_activations"] == "fp8 per-token dynamic"
    )
    assert "checkpoint_kv_cache" not in record
    stored = load_file(str(ckpt / "model.safetensors"))
    params = dict(load_model(tmp_path / "engine", device="cpu")[0].named_parameters())
    down = stored["model.layers.0.mlp.down_proj.weight_scale"].reshape(-1)
    assert torch.equal(params["model.layers.0.mlp.down_proj.weight_scale"], down)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algo": "NVFP4"}, "quant_algo 'NVFP4' is not supported"),
        ({"algo": "W4A16_AWQ"}, "quant_algo 'W4A16_AWQ' is not supported"),
        ({"kv_cache_quant_algo": "NVFP4"}, "kv_cache_quant_algo 'NVFP4'"),
        ({"exclude_modules": ["lm_head", "model.layers.0.mlp.down_proj"]}, "leaves some decoder linears"),
        ({"exclude_modules": ["*"]}, "leaves some decoder linears"),
    ],
)
def test_what_kiln_does_not_build_is_refused_by_name(
    tiny_gqa_dir: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    algo = changes.pop("algo", "FP8")
    ckpt = write_modelopt(tiny_gqa_dir, tmp_path / "bad", algo="FP8", **changes)
    if algo != "FP8":
        spec = json.loads((ckpt / "hf_quant_config.json").read_text())
        spec["quantization"]["quant_algo"] = algo
        (ckpt / "hf_quant_config.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=message):
        build_engine(ckpt, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


def test_serving_the_export_directly_says_to_build_it(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    from kiln.serve.model_source import resolve_model_dir

    ckpt = write_modelopt(tiny_gqa_dir, tmp_path / "modelopt")
    with pytest.raises(CheckpointError, match=r"pre-quantized FP8 checkpoint: build it"):
        resolve_model_dir(str(ckpt))


def test_its_kv_scales_become_the_fp8_kv_cache_without_calibrating(
    tiny_gqa_dir: Path, tmp_path: Path
) -> None:
    ckpt = write_modelopt(tiny_gqa_dir, tmp_path / "modelopt")
    manifest = build_engine(ckpt, tmp_path / "engine", kv_cache_dtype="fp8", progress=False)
    assert manifest.kv_cache_dtype == "fp8" and manifest.kv_cache_config.calibration is None
    assert manifest.kv_cache_config.checkpoint == "pre-quantized (NVIDIA ModelOpt)"
    assert "used as the fp8 KV cache's" in manifest.quant_config.prequantized["checkpoint_kv_cache"]
    model = load_model(tmp_path / "engine", device="cpu")[0]
    for layer in model.model.layers:
        assert float(layer.self_attn.k_scale) == float(layer.self_attn.v_scale) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="carries its own FP8 KV-cache scales"):
        build_engine(ckpt, tmp_path / "e", kv_cache_dtype="fp8", calib_size=4, progress=False)
