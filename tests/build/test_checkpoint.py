"""Resolving CHECKPOINT (directory, .gguf, hub id) and streaming tensors from (sharded) safetensors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.build.checkpoint import (
    hf_tensor_count,
    hf_weight_files,
    iter_hf_tensors,
    read_hf_config,
    resolve_checkpoint,
)
from kiln.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_local_directory_resolves(tiny_gqa_dir: Path) -> None:
    resolved = resolve_checkpoint(str(tiny_gqa_dir))
    assert (resolved.kind, resolved.path, resolved.source) == ("hf", tiny_gqa_dir, str(tiny_gqa_dir))
    assert hf_weight_files(tiny_gqa_dir) == [tiny_gqa_dir / "model.safetensors"]


def test_gguf_file_resolves(tmp_path: Path) -> None:
    (tmp_path / "m.GGUF").write_bytes(b"GGUF")
    assert resolve_checkpoint(tmp_path / "m.GGUF").kind == "gguf"
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a \.gguf"):
        resolve_checkpoint(tmp_path / "m.bin")


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "org" / "name"))
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint("./org/name")


def test_sharded_checkpoint_streams_every_tensor(tiny_gqa_dir: Path, tiny_gqa_sharded: Path) -> None:
    sharded = tiny_gqa_sharded
    assert [p.name for p in hf_weight_files(sharded)] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    original = load_file(str(tiny_gqa_dir / "model.safetensors"))
    streamed = dict(iter_hf_tensors(sharded))
    assert streamed.keys() == original.keys()
    assert all(torch.equal(streamed[n], original[n]) for n in original)
    assert hf_tensor_count(sharded) == len(original)


def test_missing_shard_is_refused(tiny_gqa_sharded: Path) -> None:
    (tiny_gqa_sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shards .*model-00002-of-00003"):
        resolve_checkpoint(tiny_gqa_sharded)


def test_corrupt_index_and_weights_are_refused(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_gqa_dir, broken)
    (broken / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        hf_weight_files(broken)
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        list(iter_hf_tensors(broken))


def test_pickle_only_checkpoint_is_refused_with_advice(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_gqa_dir / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model\*\.bin.*safetensors"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel is not a Llama-family"),
        ({"model_type": "gpt2", "architectures": None}, "model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ],
)
def test_non_llama_config_is_refused(tiny_gqa_dir: Path, tmp_path: Path, change: dict, message: str) -> None:
    hf = json.loads((tiny_gqa_dir / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            hf.pop(key)
        else:
            hf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=message):
        read_hf_config(tmp_path)


def test_missing_or_corrupt_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_hf_config(tmp_path)


def test_hub_id_offline_raises_offline_error(tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the check runs in a fresh interpreter.
    code = (
        "from kiln.build.checkpoint import resolve_checkpoint\n"
        "from kiln.errors import OfflineError\n"
        "try:\n"
        "    resolve_checkpoint('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "except OfflineError as exc:\n"
        "    print('OFFLINE:', exc)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache: nothing to fall back on
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "OFFLINE:" in result.stdout
    assert "offline or unreachable" in result.stdout
    assert "kiln build --tiny" in result.stdout


def test_model_safetensors_wins_over_stray_files(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    # Mistral-style repos carry consolidated.safetensors beside the HF weights; reading both would duplicate.
    repo = tmp_path / "repo"
    shutil.copytree(tiny_gqa_dir, repo)
    shutil.copyfile(repo / "model.safetensors", repo / "consolidated.safetensors")
    assert hf_weight_files(repo) == [repo / "model.safetensors"]
    (repo / "model.safetensors").rename(repo / "weights.safetensors")
    assert [p.name for p in hf_weight_files(repo)] == ["consolidated.safetensors", "weights.safetensors"]


def test_hub_id_downloads_only_what_a_build_needs(tiny_gqa_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    from kiln.build import EngineManifest, build_engine

    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        return str(tiny_gqa_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # so "org/tiny" is not a local path
    resolved = resolve_checkpoint("org/tiny")
    assert (resolved.kind, resolved.path, resolved.from_hub) == ("hf", tiny_gqa_dir, True)
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/tiny"
    assert "*.safetensors" in kwargs["allow_patterns"] and "*.bin" not in kwargs["allow_patterns"]
    build_engine("org/tiny", tmp_path / "e", dtype="float32", progress=False)
    manifest = EngineManifest.load(tmp_path / "e")
    assert manifest.source == manifest.served_model_name == "org/tiny"


@pytest.mark.parametrize(
    ("error", "message"), [("RepositoryNotFoundError", "not found"), ("GatedRepoError", "gated")]
)
def test_hub_errors_become_checkpoint_errors(tmp_path: Path, monkeypatch, error: str, message: str) -> None:
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/x"))

    def fail(repo_id: str, **kwargs) -> str:
        raise getattr(errors, error)("hub says no", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint("org/x")
