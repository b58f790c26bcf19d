"""engine.json: round trip, and every way a directory is refused (with a message naming the problem)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.config import EngineLimits, ModelConfig
from kiln.engine_dir import MANIFEST_NAME, EngineManifest, is_engine_dir, sha256_file
from kiln.errors import InvalidEngineError
from kiln.version import ENGINE_FORMAT_VERSION

WEIGHTS = b"\x01\x02weights" * 100
TOKENIZER = b'{"model": "bpe"}'


def _model() -> ModelConfig:
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_scaling={"rope_type": "llama3", "factor": 8.0},
        eos_token_ids=[0, 2],
    )


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    """A minimal valid engine directory: one weight file, one tokenizer file, engine.json."""
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    (tmp_path / "tokenizer.json").write_bytes(TOKENIZER)
    EngineManifest(
        backend="native",
        model=_model(),
        dtype="fp16",
        weight_files={"model.safetensors": sha256_file(tmp_path / "model.safetensors")},
        limits=EngineLimits(max_batch_size=8, max_seq_len=512),
        tokenizer_files=["tokenizer.json"],
        file_sizes={"model.safetensors": len(WEIGHTS), "tokenizer.json": len(TOKENIZER)},
        served_model_name="tiny",
        source="tiny(seed=0)",
        extra={"gguf_file_type": "MOSTLY_Q4_1"},
    ).save(tmp_path)
    return tmp_path


def _edit(engine_dir: Path, **changes: object) -> None:
    data = json.loads((engine_dir / MANIFEST_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(data))


def test_round_trip_keeps_every_field(engine_dir: Path) -> None:
    loaded = EngineManifest.load(engine_dir, verify_checksums=True)
    assert loaded.backend == "native"
    assert loaded.model == _model()
    assert loaded.dtype == "float16"  # canonical name, whatever alias was given
    assert loaded.limits == EngineLimits(max_batch_size=8, max_seq_len=512)
    assert loaded.weight_files == {"model.safetensors": sha256_file(engine_dir / "model.safetensors")}
    assert loaded.tokenizer_files == ["tokenizer.json"]
    assert loaded.served_model_name == "tiny"
    assert loaded.source == "tiny(seed=0)"
    assert loaded.quantization is None
    assert loaded.format_version == ENGINE_FORMAT_VERSION
    assert loaded.extra == {"gguf_file_type": "MOSTLY_Q4_1"}
    assert loaded.created.endswith("+00:00")
    assert loaded.weight_paths(engine_dir) == [engine_dir / "model.safetensors"]
    assert EngineManifest.from_dict(loaded.to_dict()) == loaded
    assert is_engine_dir(engine_dir)
    assert not list(engine_dir.glob(".engine-*"))  # the atomic write left no temp file


def test_unknown_keys_are_ignored(engine_dir: Path) -> None:
    _edit(engine_dir, added_by_a_later_minor_release=True)
    assert EngineManifest.load(engine_dir).backend == "native"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / MANIFEST_NAME).unlink(), "has no engine.json"),
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / MANIFEST_NAME).write_bytes(b"\xff\xfe"), "not valid JSON"),
        (lambda d: (d / MANIFEST_NAME).write_text("[1, 2]"), "must hold a JSON object"),
        (lambda d: _edit(d, weight_files=None), "missing fields ['weight_files']"),
        (lambda d: _edit(d, backend=None, model=None), "missing fields ['backend', 'model']"),
        (lambda d: _edit(d, format_version=ENGINE_FORMAT_VERSION + 1), "newer than this Kiln reads"),
        (lambda d: _edit(d, format_version="1"), "format_version must be an integer"),
        (lambda d: _edit(d, backend="onnx"), "unknown backend 'onnx'"),
        (lambda d: _edit(d, dtype="int3"), "invalid model, limits or dtype"),
        (lambda d: _edit(d, model={"vocab_size": 3}), "invalid model, limits or dtype"),
        (lambda d: _edit(d, weight_files={}), "weight_files must be a non-empty"),
        (lambda d: _edit(d, tokenizer_files=["../../etc/passwd"]), "not inside the engine directory"),
        (lambda d: (d / "model.safetensors").unlink(), "missing file model.safetensors"),
        (lambda d: (d / "tokenizer.json").unlink(), "missing file tokenizer.json"),
        (lambda d: (d / "model.safetensors").write_bytes(WEIGHTS[:-10]), "truncated"),
        (
            lambda d: (d / "tokenizer.json").write_bytes(TOKENIZER + b" "),
            "tokenizer.json is 17 bytes, expected 16",
        ),
    ],
)
def test_damaged_engine_is_refused(engine_dir: Path, damage, message: str) -> None:
    damage(engine_dir)
    with pytest.raises(InvalidEngineError) as info:
        EngineManifest.load(engine_dir)
    assert message in str(info.value)
    assert not is_engine_dir(engine_dir)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidEngineError, match="does not exist"):
        EngineManifest.load(tmp_path / "nope")
    assert not is_engine_dir(tmp_path / "nope")


def test_same_size_corruption_is_caught_only_by_checksums(engine_dir: Path) -> None:
    corrupt = bytearray(WEIGHTS)
    corrupt[5] ^= 0xFF
    (engine_dir / "model.safetensors").write_bytes(bytes(corrupt))
    EngineManifest.load(engine_dir)  # sizes match: the cheap check passes
    with pytest.raises(InvalidEngineError, match="fails its sha256 check"):
        EngineManifest.load(engine_dir, verify_checksums=True)


def test_file_listed_only_in_sizes_must_exist(engine_dir: Path) -> None:
    (engine_dir / "model.safetensors.index.json").write_text("{}")
    data = json.loads((engine_dir / MANIFEST_NAME).read_text())
    _edit(engine_dir, file_sizes={**data["file_sizes"], "model.safetensors.index.json": 2})
    EngineManifest.load(engine_dir)
    (engine_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(InvalidEngineError, match=r"missing file model\.safetensors\.index\.json"):
        EngineManifest.load(engine_dir)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # > 1 MiB: more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
