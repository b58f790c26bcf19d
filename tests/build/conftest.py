"""Fixtures of the build tests: a hand-sharded copy of the tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file


def shard_checkpoint(src: Path, dst: Path, num_shards: int) -> Path:
    """Copy a single-file HF checkpoint into dst split into num_shards files with an index, as HF does."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_shards]}
        save_file(part, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture
def tiny_gqa_sharded(tiny_gqa_dir: Path, tmp_path: Path) -> Path:
    """tiny_gqa_dir split into 3 safetensors shards plus model.safetensors.index.json (a fresh copy per test)."""
    return shard_checkpoint(tiny_gqa_dir, tmp_path / "sharded", num_shards=3)
