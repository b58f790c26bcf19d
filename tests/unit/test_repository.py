"""ModelRepository: DIR/<model>/<version>/ engine directories, the highest valid one, problems named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kiln.serve.repository import ModelRepository, RepositoryError


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.build.native import build_engine
    from kiln.build.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0)
    out = tmp_path_factory.mktemp("engine") / "e"
    build_engine(checkpoint, out, dtype="float32", progress=False)
    return out


def _repo(root: Path, engine_dir: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(engine_dir, root / "m" / name)
    return root


def test_the_highest_valid_version_and_every_problem(tmp_path: Path, engine_dir: Path) -> None:
    root = _repo(tmp_path, engine_dir, "1", "3")
    (root / "m" / "7").mkdir()  # still being built: no engine.json
    (root / "m" / "latest").mkdir()
    (root / "m" / "05").mkdir()
    (root / "m" / "4").mkdir()
    (root / "m" / "4" / "engine.json").write_text("{not json")
    repo = ModelRepository(root)
    assert repo.model == "m"
    entries = {e.name: e for e in repo.scan()}
    assert [e.name for e in repo.scan()] == ["1", "3", "4", "7", "05", "latest"]
    assert repo.valid_versions() == [1, 3]
    assert repo.latest().number == 3
    assert "still being built" in (entries["7"].problem or "")
    assert "positive integers" in (entries["latest"].problem or "")
    assert entries["05"].number is None
    assert entries["4"].problem is not None and not entries["4"].valid
    assert repo.version(4).problem == entries["4"].problem
    with pytest.raises(KeyError):
        repo.version(9)


def test_models_are_named_or_unique(tmp_path: Path, engine_dir: Path) -> None:
    _repo(tmp_path, engine_dir, "1")
    (tmp_path / "other").mkdir()
    with pytest.raises(RepositoryError, match=r"holds 2 models .*--repository-model"):
        ModelRepository(tmp_path)
    assert ModelRepository(tmp_path, "m").model == "m"
    with pytest.raises(RepositoryError, match="has no model 'x'"):
        ModelRepository(tmp_path, "x")
    with pytest.raises(RepositoryError, match="not a directory"):
        ModelRepository(tmp_path / "missing")


def test_no_valid_version_says_why(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(RepositoryError, match=r"no valid version \(1: no engine.json yet"):
        ModelRepository(tmp_path).latest()


def test_each_version_gets_half_the_gpu_budget() -> None:
    from kiln.config import EngineConfig
    from kiln.serve.rollout import version_engine_config

    assert version_engine_config(EngineConfig(gpu_memory_utilization=0.9)).gpu_memory_utilization == 0.45
    sized = EngineConfig(gpu_memory_utilization=0.9, kv_cache_memory_bytes=1 << 30)
    assert version_engine_config(sized) == sized  # bytes given: each version's own
