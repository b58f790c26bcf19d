"""Native quantized engines on disk: what `kiln build --quantization` writes, what engine.json records,
how the loader reads it back, and every refusal (by name) of a scheme, layout or device that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import kiln.cli
from kiln.build import build_tiny_engine
from kiln.build.trtllm import canonical_quantization as trtllm_quantization
from kiln.config import QUANTIZED_LINEARS, QuantConfig, canonical_quantization
from kiln.engine_dir import MANIFEST_NAME, EngineManifest
from kiln.errors import CheckpointError, InvalidEngineError
from kiln.models.loader import build_empty_model, load_model
from kiln.models.quant_linear import QuantizedLinear, check_device_supports

runner = CliRunner()


def _tensors(engine_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(engine_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q") / "int8"
    build_tiny_engine(out, dtype="bfloat16", quantization="int8-wo", quant_group_size=16)
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q") / "fp8"
    build_tiny_engine(out, dtype="bfloat16", quantization="fp8")
    return out


def test_the_spellings_of_each_scheme_agree_across_backends() -> None:
    for name, canonical in [
        ("int8-wo", "int8_wo"),
        ("INT8_WO", "int8_wo"),
        ("fp8", "fp8"),
        ("int8-sq", "int8_sq"),
    ]:
        assert canonical_quantization(name) == trtllm_quantization(name) == canonical
    assert canonical_quantization("none") is None
    with pytest.raises(ValueError, match="choose one of fp8, int8-wo, int8-sq"):
        canonical_quantization("int4")


def test_int8_weights_and_their_scales_are_stored_side_by_side(int8_dir: Path) -> None:
    manifest = EngineManifest.load(int8_dir)
    assert manifest.quantization == "int8_wo" and manifest.format_version == 2
    assert manifest.quant_config == QuantConfig(scheme="int8_wo", group_size=16)
    recorded = json.loads((int8_dir / MANIFEST_NAME).read_text())["quant_config"]
    assert recorded["scale_layout"] == "per-group of 16" and recorded["weight_dtype"] == "int8"
    assert recorded["linears"] == list(QUANTIZED_LINEARS) and "lm_head" in recorded["unquantized"]
    tensors = _tensors(int8_dir)
    for linear, (rows, cols) in {"self_attn.qkv_proj": (128, 64), "mlp.down_proj": (64, 128)}.items():
        weight = f"model.layers.1.{linear}.weight"
        assert tensors[weight].dtype == torch.int8 and tensors[weight].shape == (rows, cols)
        scale = tensors[weight + "_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (rows, cols // 16)
    for kept in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]:
        assert tensors[kept].dtype == torch.bfloat16  # not quantized: the engine's dtype
        assert kept + "_scale" not in tensors


def test_fp8_weights_have_per_channel_scales(fp8_dir: Path) -> None:
    manifest = EngineManifest.load(fp8_dir)
    assert manifest.quantization == "fp8" and manifest.quant_config == QuantConfig(scheme="fp8")
    assert manifest.quant_config.to_dict()["activations"] == "fp8 per-token dynamic"
    tensors = _tensors(fp8_dir)
    weight = tensors["model.layers.0.mlp.gate_up_proj.weight"]
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (256, 64)
    assert tensors["model.layers.0.mlp.gate_up_proj.weight_scale"].shape == (256,)


def test_an_unquantized_engine_keeps_format_version_1(tmp_path: Path) -> None:
    manifest = build_tiny_engine(tmp_path / "plain")
    assert manifest.format_version == 1 and manifest.quantization is None and manifest.quant_config is None
    assert json.loads((tmp_path / "plain" / MANIFEST_NAME).read_text())["quant_config"] is None


@pytest.mark.parametrize("which", ["int8_dir", "fp8_dir"])
def test_the_loader_keeps_quantized_storage_dtypes(which: str, request: pytest.FixtureRequest) -> None:
    model, _ = load_model(request.getfixturevalue(which), dtype=torch.float16)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, QuantizedLinear)
    assert layer.weight.dtype == (torch.int8 if which == "int8_dir" else torch.float8_e4m3fn)
    assert layer.weight_scale.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.lm_head is not None and model.lm_head.weight.dtype == torch.float16
    assert not isinstance(model.lm_head, QuantizedLinear)


def test_a_quantized_weight_in_another_dtype_is_refused(int8_dir: Path) -> None:
    manifest = EngineManifest.load(int8_dir)
    model = build_empty_model(manifest.model, dtype=torch.float32, device="cpu", quant=manifest.quant_config)
    tensors = _tensors(int8_dir)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].float()  # the right shape, but not int8
    with pytest.raises(CheckpointError, match=r"o_proj.weight' is torch.float32.*int8_wo.*torch.int8"):
        model.load_weights(tensors)


@pytest.fixture(scope="module")
def sq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q") / "sq"
    build_tiny_engine(out, dtype="bfloat16", quantization="int8-sq", calib_size=2, smoothquant_alpha=0.6)
    return out


def test_int8_sq_stores_smoothed_int8_weights_and_records_its_calibration(sq_dir: Path) -> None:
    manifest = EngineManifest.load(sq_dir)
    quant = manifest.quant_config
    assert manifest.quantization == "int8_sq" and manifest.format_version == 2 and quant is not None
    assert quant.smoothquant_alpha == 0.6
    assert quant.calibration is not None and quant.calibration["num_tokens"] == 2 * 512
    assert quant.calibration["dataset"].startswith("pydoc_data.topics (Python ")
    assert len(quant.calibration["sha256"]) == 64
    recorded = json.loads((sq_dir / MANIFEST_NAME).read_text())["quant_config"]
    assert recorded["activations"].startswith("int8 per-token dynamic")
    assert recorded["smoothing"]["explicit_smooth_scale"] == ["self_attn.o_proj", "mlp.down_proj"]
    tensors = _tensors(sq_dir)
    for layer in range(manifest.model.num_hidden_layers):
        for linear in QUANTIZED_LINEARS:
            name = f"model.layers.{layer}.{linear}"
            assert tensors[f"{name}.weight"].dtype == torch.int8
            assert tensors[f"{name}.weight_scale"].shape == (tensors[f"{name}.weight"].shape[0],)
            explicit = linear in ("self_attn.o_proj", "mlp.down_proj")
            assert (f"{name}.smooth_scale" in tensors) == explicit
            if explicit:
                smooth = tensors[f"{name}.smooth_scale"]
                assert smooth.dtype == torch.float32 and (smooth > 0).all() and not (smooth == 1).all()
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    model, _ = load_model(sq_dir, dtype=torch.float32)
    assert model.model.layers[0].mlp.down_proj.smooth_scale is not None
    assert model.model.layers[0].mlp.gate_up_proj.smooth_scale is None


def test_int8_sq_norms_carry_the_folded_smoothing(sq_dir: Path, tmp_path: Path) -> None:
    """The RMSNorm feeding qkv_proj is the unquantized one divided by s: s is > 0 and not all 1s."""
    plain = tmp_path / "plain"
    build_tiny_engine(plain, dtype="bfloat16")
    ratio = (
        _tensors(plain)["model.layers.0.input_layernorm.weight"].float()
        / _tensors(sq_dir)["model.layers.0.input_layernorm.weight"].float()
    )
    assert (ratio > 0).all() and (ratio - 1).abs().max() > 0.1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"quantization": "int8-wo", "smoothquant_alpha": 0.5},
            "alpha and calibration apply to int8_sq only",
        ),
        ({"smoothquant_alpha": 0.5}, "alpha needs --quantization int8-sq"),
        ({"quantization": "int8-sq", "smoothquant_alpha": 1.5}, r"alpha in \[0, 1\], got 1.5"),
        ({"quantization": "int8-sq", "quant_group_size": 16}, "group size applies to int8_wo only"),
        ({"quantization": "int8-sq", "calib_size": 0}, "calibration size must be >= 1"),
        ({"quantization": "int8-sq", "calib_dataset": "/no/such/file.txt"}, "calibration dataset /no/such"),
        ({"quantization": "fp8", "calib_dataset": "x.txt"}, "calibration dataset applies to int8_sq"),
    ],
)
def test_bad_smoothquant_options_are_refused_before_anything_is_written(
    tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_tiny_engine(tmp_path / "sq", **options)
    assert not (tmp_path / "sq").exists()
    assert list(tmp_path.iterdir()) == []  # no calibration directory left behind either


def test_kiln_build_int8_sq_calibrates_on_a_users_file(tmp_path: Path) -> None:
    from kiln.build.calibrate import calibration_set

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "e"
    args = ["build", "--tiny", "-o", str(out), "--quantization", "int8-sq", "--calib-dataset", str(text)]
    result = runner.invoke(kiln.cli.app, [*args, "--calib-size", "1", "--smoothquant-alpha", "0.8"])
    assert result.exit_code == 0, result.output
    assert "native, float32, int8_sq" in result.output
    quant = EngineManifest.load(out).quant_config
    assert quant is not None and quant.smoothquant_alpha == 0.8
    assert quant.calibration == calibration_set(text).record(quant.calibration["num_tokens"])
    assert quant.calibration["dataset"] == str(text.resolve()) and 0 < quant.calibration["num_tokens"] <= 512
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "e"]  # the float32 build is gone


@pytest.mark.parametrize(
    ("quantization", "group_size", "message"),
    [
        ("fp8", 16, "group size applies to int8_wo only"),
        ("int8-wo", 48, "group size 48 does not divide"),
        ("int8-wo", 0, "group size must be a positive integer"),
        (None, 16, "group size needs --quantization int8-wo"),
        ("int4", None, "unknown quantization 'int4'"),
    ],
)
def test_bad_quantization_flags_are_refused(
    tmp_path: Path, quantization: str | None, group_size: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_tiny_engine(tmp_path / "e", quantization=quantization, quant_group_size=group_size)


def test_kiln_build_writes_a_quantized_native_engine(tmp_path: Path) -> None:
    out = tmp_path / "e"
    args = ["build", "--tiny", "-o", str(out), "--quantization", "int8-wo", "--quant-group-size", "32"]
    result = runner.invoke(kiln.cli.app, args)
    assert result.exit_code == 0, result.output
    assert "native, float32, int8_wo" in result.output
    assert EngineManifest.load(out).quant_config == QuantConfig(scheme="int8_wo", group_size=32)


def _edit(engine_dir: Path, **changes: object) -> None:
    path = engine_dir / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 1}, "quantized weights need format_version >= 2"),
        ({"quantization": "fp8"}, "disagrees with quant_config's scheme 'int8_wo'"),
        ({"backend": "trtllm"}, "quant_config is for native engines"),
        (
            {"quant_config": {"scheme": "int8_sq"}, "quantization": "int8_sq"},
            "int8_sq needs a SmoothQuant alpha",
        ),
        ({"quant_config": {"scheme": "int8_wo", "linears": ["lm_head"]}}, "quantized linears must be"),
    ],
)
def test_inconsistent_quantization_records_are_refused(
    int8_dir: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_dir, copy)
    _edit(copy, **changes)
    with pytest.raises(InvalidEngineError, match=message):
        EngineManifest.load(copy)


def test_a_native_engine_quantized_without_its_layout_does_not_load(int8_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_dir, copy)
    _edit(copy, quant_config=None)
    with pytest.raises(InvalidEngineError, match="quantized 'int8_wo' but not how"):
        load_model(copy)


def test_fp8_is_refused_by_name_on_a_gpu_without_fp8_tensor_cores(
    fp8_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(InvalidEngineError, match=r"quantized fp8.*>= 8\.9.*A100-SXM4-80GB is 8\.0"):
        load_model(fp8_dir, device="cuda")  # refused before any memory is touched on the device
    check_device_supports(QuantConfig(scheme="int8_wo"), "cuda")  # int8 weight-only runs there
    check_device_supports(QuantConfig(scheme="int8_sq", smoothquant_alpha=0.5), "cuda")
    check_device_supports(QuantConfig(scheme="fp8"), "cpu")  # the CPU runs the references
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device_supports(QuantConfig(scheme="fp8"), "cuda")
