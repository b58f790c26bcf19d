"""Engines with an fp8 KV cache on disk: what `kiln build --kv-cache-dtype fp8` writes (the calibrated
per-layer scales, engine.json's record), how the loader and the engine read it back, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_checks import assert_greedy_is_the_prefill_argmax
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import kiln.cli
from kiln import LLM
from kiln.build import build_engine, build_tiny_engine
from kiln.build.calibrate import calibration_set, calibration_tokens, kv_cache_scales
from kiln.build.fp8_kv import KV_SCALES_NAME
from kiln.config import FP8_E4M3_MAX, EngineConfig, KVCacheConfig, canonical_kv_cache_dtype
from kiln.engine.llm_engine import LLMEngine
from kiln.engine_dir import MANIFEST_NAME, EngineManifest
from kiln.errors import CheckpointError, InvalidEngineError
from kiln.models.loader import build_empty_model, load_model
from kiln.models.quant_linear import check_kv_cache_supports
from kiln.models.tokenizer import Tokenizer

runner = CliRunner()
CALIB_SAMPLES = 1  # one sample of 512 tokens: the tests check the plumbing, not the statistics


@pytest.fixture(scope="module")
def fp8_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kv") / "fp8kv"
    result = runner.invoke(
        kiln.cli.app,
        ["build", "--tiny", "-o", str(out), "--kv-cache-dtype", "fp8", "--calib-size", str(CALIB_SAMPLES)],
    )
    assert result.exit_code == 0, result.output
    assert "native, float32, KV cache fp8" in result.output
    return out


@pytest.fixture(scope="module")
def auto_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kv") / "auto"
    build_tiny_engine(out)
    return out


def _edit(engine_dir: Path, tmp_path: Path, **changes: object) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    path = copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return copy


def test_kv_cache_dtype_names_and_records() -> None:
    assert [canonical_kv_cache_dtype(n) for n in (None, "auto", "AUTO", "fp8", "fp8_e4m3")] == [
        "auto",
        "auto",
        "auto",
        "fp8",
        "fp8",
    ]
    for bad in ("fp16", "fp8_e5m2", "int8"):
        with pytest.raises(ValueError, match=r"choose auto .* or fp8"):
            canonical_kv_cache_dtype(bad)
    record = KVCacheConfig(calibration={"dataset": "d", "sha256": "0" * 64, "num_tokens": 3})
    assert KVCacheConfig.from_dict(record.to_dict()) == record
    assert (
        record.to_dict()["storage_dtype"] == "float8_e4m3fn" and record.to_dict()["scale_dtype"] == "float32"
    )
    for bad_record, message in [
        ({"dtype": "auto"}, "for dtype fp8"),
        ({"dtype": "fp8", "scale_layout": "per_head"}, "scale layout 'per_head'"),
        ({"dtype": "fp8", "calibration": "text"}, "calibration must be an object"),
        ({"scale_layout": "per_tensor"}, "must be an object with a 'dtype'"),
    ]:
        with pytest.raises(ValueError, match=message):
            KVCacheConfig.from_dict(bad_record)


def test_the_build_writes_calibrated_scales_and_records_them(fp8_kv_dir: Path, auto_dir: Path) -> None:
    manifest = EngineManifest.load(fp8_kv_dir, verify_checksums=True)
    assert manifest.kv_cache_dtype == "fp8" and manifest.format_version == 3 and manifest.quantization is None
    kv = manifest.kv_cache_config
    assert kv is not None and kv.scale_layout == "per_tensor"
    calib = calibration_set()
    assert kv.calibration == calib.record(kv.calibration["num_tokens"])
    assert kv.calibration["num_tokens"] == 512 * CALIB_SAMPLES
    assert EngineManifest.from_dict(manifest.to_dict()) == manifest  # the round trip keeps every field
    raw = json.loads((fp8_kv_dir / MANIFEST_NAME).read_text())
    assert raw["kv_cache_dtype"] == "fp8" and raw["kv_cache_config"]["scale_layout"] == "per_tensor"
    assert KV_SCALES_NAME in manifest.weight_files and KV_SCALES_NAME in manifest.file_sizes
    layers = manifest.model.num_hidden_layers
    with safe_open(str(fp8_kv_dir / KV_SCALES_NAME), framework="pt") as f:
        scales = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert sorted(scales) == sorted(
        f"model.layers.{i}.self_attn.{kv}_scale" for i in range(layers) for kv in "kv"
    )
    assert all(t.dtype == torch.float32 and t.shape == (1,) and t.item() > 0 for t in scales.values())
    # The scales are amax / 448 of what the same engine with a float32 cache computes on the same text:
    model, _ = load_model(auto_dir, dtype=torch.float32)
    samples = calibration_tokens(Tokenizer(auto_dir).encode(calib.text), CALIB_SAMPLES)
    expected = kv_cache_scales(model, samples)
    assert scales.keys() == expected.keys() and all(torch.equal(scales[n], expected[n]) for n in scales)
    # ... measured from the cache itself: K after the rotary embedding
    k_amax = scales["model.layers.0.self_attn.k_scale"].item() * FP8_E4M3_MAX
    assert k_amax > 0
    # The other weights are those of the engine built without the flag.
    plain = load_file(str(auto_dir / "model.safetensors"))
    ours = load_file(str(fp8_kv_dir / "model.safetensors"))
    assert plain.keys() == ours.keys() and all(torch.equal(plain[n], ours[n]) for n in plain)


def test_an_older_manifest_without_the_field_is_a_16_bit_cache(auto_dir: Path, tmp_path: Path) -> None:
    copy = _edit(auto_dir, tmp_path, kv_cache_dtype=None, kv_cache_config=None)
    manifest = EngineManifest.load(copy)
    assert (
        manifest.kv_cache_dtype == "auto"
        and manifest.kv_cache_config is None
        and manifest.format_version == 1
    )
    assert EngineManifest.from_dict(manifest.to_dict()) == manifest
    model, _ = load_model(copy)
    assert model.kv_cache is None and model.kv_cache_dtype == torch.float32


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 2}, "fp8 KV cache needs format_version >= 3"),
        ({"kv_cache_dtype": "auto"}, "kv_cache_dtype 'auto' disagrees with kv_cache_config's dtype 'fp8'"),
        ({"kv_cache_config": None}, "kv_cache_dtype is fp8 but there is no kv_cache_config"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype: unknown KV-cache dtype"),
        ({"kv_cache_config": {"dtype": "fp8", "scale_layout": "per_head"}}, "scale layout 'per_head'"),
        ({"backend": "trtllm"}, "kv_cache_config is for native engines"),
        ({"format_version": 4}, "newer than this Kiln reads"),
    ],
)
def test_inconsistent_kv_cache_records_are_refused(
    fp8_kv_dir: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(InvalidEngineError, match=message):
        EngineManifest.load(_edit(fp8_kv_dir, tmp_path, **changes))


def test_the_loader_is_strict_about_the_scale_tensors(fp8_kv_dir: Path) -> None:
    manifest = EngineManifest.load(fp8_kv_dir)
    tensors = {
        **load_file(str(fp8_kv_dir / "model.safetensors")),
        **load_file(str(fp8_kv_dir / KV_SCALES_NAME)),
    }

    def load(weights: dict) -> None:
        model = build_empty_model(
            manifest.model, dtype=torch.float32, device="cpu", kv_cache=manifest.kv_cache_config
        )
        model.load_weights(weights)

    load(tensors)
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.v_scale"]
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.self_attn.v_scale'\]"):
        load(missing)
    wrong = {
        **tensors,
        "model.layers.0.self_attn.k_scale": tensors["model.layers.0.self_attn.k_scale"].bfloat16(),
    }
    with pytest.raises(CheckpointError, match=r"fp8 KV cache stores it as torch\.float32"):
        load(wrong)
    shaped = {**tensors, "model.layers.0.self_attn.k_scale": torch.ones(2)}
    with pytest.raises(CheckpointError, match=r"has shape \(2,\), expected \(1,\)"):
        load(shaped)
    # an engine without an fp8 cache does not take the scales
    plain = build_empty_model(manifest.model, dtype=torch.float32, device="cpu")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.k_scale'"):
        plain.load_weights(tensors)


def test_fp8_kv_is_refused_by_name_on_a_gpu_before_ada(
    fp8_kv_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(
        InvalidEngineError, match=r"KV cache is fp8.*>= 8\.9.*A100-SXM4-80GB is 8\.0.*--kv-cache-dtype auto"
    ):
        load_model(fp8_kv_dir, device="cuda")  # refused before any memory is touched on the device
    check_kv_cache_supports(None, "cuda")  # a 16-bit cache runs there
    check_kv_cache_supports(KVCacheConfig(), "cpu")  # the CPU runs the references
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_kv_cache_supports(KVCacheConfig(), "cuda")


def test_the_engine_allocates_an_fp8_cache_and_generates_with_it(fp8_kv_dir: Path) -> None:
    """The whole engine path (scheduler, paged prefill, decode steps, a batch of two prompts) over the fp8
    cache; its greedy tokens equal the model's own one-prefill argmax continuation (same fp8 cache)."""
    llm = LLM(fp8_kv_dir, device="cpu")
    engine = llm.engine
    assert engine.config.kv_cache_dtype == "fp8" and engine.model_info.extra["kv_cache_dtype"] == "fp8"
    assert all(k.dtype == v.dtype == torch.float8_e4m3fn for k, v in engine.runner.kv_caches)
    assert_greedy_is_the_prefill_argmax(llm, fp8_kv_dir)


def test_an_fp8_cache_holds_twice_the_blocks_of_a_bf16_one(tmp_path: Path) -> None:
    budget = EngineConfig(device="cpu", kv_cache_memory_bytes=3 << 20, load_progress=False)
    blocks = {}
    for kv in ("auto", "fp8"):
        out = tmp_path / kv
        build_tiny_engine(out, dtype="bfloat16", kv_cache_dtype=kv, calib_size=1)
        engine = LLMEngine.from_path(out, budget)
        blocks[kv] = engine.config.num_kv_blocks
        assert engine.runner.kv_caches[0][0].dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
    assert blocks["fp8"] == 2 * blocks["auto"] > 0


def test_build_refuses_bad_kv_cache_flags(tmp_path: Path) -> None:
    out = str(tmp_path / "e")
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", out, "--kv-cache-dtype", "fp16"])
    assert result.exit_code == 2 and "unknown KV-cache dtype 'fp16'" in result.output
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", out, "--calib-size", "3"])
    assert result.exit_code == 2 and "--kv-cache-dtype fp8" in result.output
    with pytest.raises(ValueError, match="unknown KV-cache dtype 'e5m2'"):
        build_tiny_engine(tmp_path / "x", kv_cache_dtype="e5m2")
    with pytest.raises(ValueError, match="calibration size must be >= 1"):
        build_tiny_engine(tmp_path / "x", kv_cache_dtype="fp8", calib_size=0)
    with pytest.raises(ValueError, match=r"applies to int8_sq .* and an fp8 KV cache only"):
        build_tiny_engine(tmp_path / "x", calib_dataset="my.txt")
    assert not (tmp_path / "x").exists()


def test_fp8_kv_combines_with_weight_quantization_and_a_users_text(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "e"
    manifest = build_tiny_engine(
        out, quantization="int8-wo", kv_cache_dtype="fp8", calib_dataset=text, calib_size=1
    )
    assert (
        manifest.quantization == "int8_wo"
        and manifest.kv_cache_dtype == "fp8"
        and manifest.format_version == 3
    )
    assert manifest.kv_cache_config.calibration["dataset"] == str(text.resolve())
    model, _ = load_model(out)
    assert model.quant is not None and model.kv_cache_dtype == torch.float8_e4m3fn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "e"]  # nothing left behind


def test_an_hf_checkpoint_builds_with_an_fp8_kv_cache(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    manifest = build_engine(tiny_gqa_dir, tmp_path / "e", dtype="float32", kv_cache_dtype="fp8", calib_size=1)
    assert manifest.kv_cache_dtype == "fp8"
    model, _ = load_model(tmp_path / "e")
    assert model.model.layers[0].self_attn.k_scale.dtype == torch.float32
