"""Native build: packed weights, dtype, sharding in and out, atomicity, refusals of damaged engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.build import EngineManifest, build_engine, build_tiny_engine, is_engine_dir
from kiln.errors import CheckpointError, InvalidEngineError


def packed_weights(engine_dir: Path) -> dict[str, torch.Tensor]:
    manifest = EngineManifest.load(engine_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in manifest.weight_paths(engine_dir):
        tensors.update(load_file(str(path)))
    return tensors


def assert_packed_from(
    packed: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], layers: int, dtype
) -> None:
    """packed must be exactly hf with q/k/v and gate/up fused, converted to dtype."""
    expected = {
        n: t for n, t in hf.items() if not any(p in n for p in ("q_proj", "k_proj", "v_proj", "gate_", "up_"))
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        attn = [hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
        expected[p + "self_attn.qkv_proj.weight"] = torch.cat(attn)
        expected[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
        )
    assert packed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert packed[name].dtype == dtype, name
        assert torch.equal(packed[name], tensor.to(dtype)), name


@pytest.fixture(scope="module")
def gqa_engine(tiny_gqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "gqa"
    build_engine(tiny_gqa_dir, out, dtype="float32", served_model_name="gqa", progress=False)
    return out


def test_engine_holds_packed_weights_tokenizer_and_manifest(gqa_engine: Path, tiny_gqa_dir: Path) -> None:
    manifest = EngineManifest.load(gqa_engine, verify_checksums=True)
    assert manifest.backend == "native" and manifest.dtype == "float32"
    assert manifest.served_model_name == "gqa"
    assert manifest.source == str(tiny_gqa_dir)
    assert list(manifest.weight_files) == ["model.safetensors"]
    assert manifest.model.eos_token_ids == [0, 2]  # config's 0 merged with generation_config's [0, 2]
    assert (
        "tokenizer.json" in manifest.tokenizer_files and "generation_config.json" in manifest.tokenizer_files
    )
    for name in manifest.tokenizer_files:
        assert (gqa_engine / name).read_bytes() == (tiny_gqa_dir / name).read_bytes()
    hf = load_file(str(tiny_gqa_dir / "model.safetensors"))
    assert_packed_from(packed_weights(gqa_engine), hf, layers=2, dtype=torch.float32)
    assert not [p for p in gqa_engine.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_tied_engine_has_no_lm_head(tiny_mha_dir: Path, tmp_path: Path) -> None:
    build_engine(tiny_mha_dir, tmp_path / "e", dtype="float32", progress=False)
    packed = packed_weights(tmp_path / "e")
    assert "lm_head.weight" not in packed
    assert_packed_from(
        packed, load_file(str(tiny_mha_dir / "model.safetensors")), layers=2, dtype=torch.float32
    )


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_conversion(tiny_gqa_dir: Path, tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    manifest = build_engine(tiny_gqa_dir, tmp_path / "e", dtype=name, progress=False)
    assert manifest.dtype == str(dtype).removeprefix("torch.")
    hf = load_file(str(tiny_gqa_dir / "model.safetensors"))
    assert_packed_from(packed_weights(tmp_path / "e"), hf, layers=2, dtype=dtype)


def test_bad_dtype_is_refused_before_any_work(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        build_engine(tiny_gqa_dir, tmp_path / "e", dtype="int4")
    assert not (tmp_path / "e").exists()


def test_sharded_checkpoint_builds_the_same_engine(
    gqa_engine: Path, tiny_gqa_sharded: Path, tmp_path: Path
) -> None:
    manifest = build_engine(tiny_gqa_sharded, tmp_path / "e", dtype="float32", progress=False)
    assert manifest.weight_files == EngineManifest.load(gqa_engine).weight_files  # same sha256


def test_large_engine_is_written_in_shards_with_an_index(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    manifest = build_engine(
        tiny_gqa_dir, tmp_path / "e", dtype="float32", progress=False, max_shard_bytes=100_000
    )
    shards = list(manifest.weight_files)
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "e" / "model.safetensors.index.json").read_text())
    packed = packed_weights(tmp_path / "e")
    assert index["weight_map"].keys() == packed.keys()
    for tensor_name, file in index["weight_map"].items():
        assert tensor_name in load_file(str(tmp_path / "e" / file))
    assert_packed_from(
        packed, load_file(str(tiny_gqa_dir / "model.safetensors")), layers=2, dtype=torch.float32
    )
    assert "model.safetensors.index.json" in manifest.file_sizes
    EngineManifest.load(tmp_path / "e", verify_checksums=True)


def test_existing_output_needs_overwrite(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_engine(tiny_gqa_dir, out, dtype="float32", progress=False)
    assert (out / "old.txt").exists()
    build_engine(tiny_gqa_dir, out, dtype="float32", progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and is_engine_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_crash_mid_build_leaves_no_engine(tiny_gqa_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import kiln.build.native as native

    def fail(path: Path) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "sha256_file", fail)
    with pytest.raises(KeyboardInterrupt):
        build_engine(tiny_gqa_dir, tmp_path / "e", dtype="float32", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_not_matching_its_config_is_refused(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gqa_dir, broken)
    hf = json.loads((broken / "config.json").read_text())
    hf["intermediate_size"] = 256
    (broken / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        CheckpointError,
        match=r"mlp\.down_proj\.weight' has shape \(64, 128\), the config implies \(64, 256\)",
    ):
        build_engine(broken, tmp_path / "e", dtype="float32", progress=False)
    assert not (tmp_path / "e").exists()


def test_checkpoint_without_tokenizer_is_refused(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_gqa_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        build_engine(bare, tmp_path / "e", progress=False)


def test_truncated_or_corrupt_weights_are_refused(gqa_engine: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(gqa_engine, damaged)
    weights = damaged / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidEngineError, match="truncated"):
        EngineManifest.load(damaged)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    weights.write_bytes(bytes(flipped))
    with pytest.raises(InvalidEngineError, match="sha256"):
        EngineManifest.load(damaged, verify_checksums=True)


def test_build_tiny_engine(tmp_path: Path) -> None:
    manifest = build_tiny_engine(tmp_path / "t", seed=3, num_key_value_heads=4)
    loaded = EngineManifest.load(tmp_path / "t", verify_checksums=True)
    assert loaded.source == manifest.source == "tiny(seed=3, num_key_value_heads=4)"
    assert loaded.served_model_name == "tiny" and loaded.dtype == "float32"
    assert loaded.model.num_key_value_heads == 4


def test_progress_bar_reports_packing(tiny_gqa_dir: Path, tmp_path: Path, capsys) -> None:
    build_engine(tiny_gqa_dir, tmp_path / "shown", dtype="float32", progress=True)
    assert "packing weights (float32)" in capsys.readouterr().err
    build_engine(tiny_gqa_dir, tmp_path / "quiet", dtype="float32", progress=False)
    assert capsys.readouterr().out == ""
