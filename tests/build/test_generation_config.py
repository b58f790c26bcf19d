"""`kiln build` records the checkpoint's generation_config.json sampling fields in engine.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import kiln.build.default_model as default_model
from kiln.build.native import build_engine
from kiln.engine_dir import (
    MANIFEST_NAME,
    EngineManifest,
    generation_config_defaults,
    read_generation_defaults,
)
from kiln.errors import CheckpointError, InvalidEngineError


def with_generation_config(src: Path, dst: Path, config: dict) -> Path:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


def test_build_records_the_sampling_fields_under_request_names(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    config = {
        "eos_token_id": [0, 2],
        "do_sample": True,  # not read: vLLM does not either
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "max_new_tokens": 7,
        "num_beams": 1,  # not a sampling default
        "top_a": None,
    }
    checkpoint = with_generation_config(tiny_gqa_dir, tmp_path / "hf", config)
    expected = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "max_tokens": 7,
    }
    manifest = build_engine(checkpoint, tmp_path / "e", dtype="float32", progress=False)
    assert manifest.generation_defaults == expected
    assert EngineManifest.load(tmp_path / "e").generation_defaults == expected
    assert read_generation_defaults(tmp_path / "e") == expected
    assert read_generation_defaults(checkpoint) == expected  # an HF directory served without a build
    assert manifest.model.eos_token_ids == [0, 2]  # the eos merge still reads the same file


def test_no_sampling_fields_record_nothing(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    manifest = build_engine(tiny_gqa_dir, tmp_path / "e", dtype="float32", progress=False)
    assert manifest.generation_defaults == {}


def test_builder_defaults_win_over_the_file(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    checkpoint = with_generation_config(tiny_gqa_dir, tmp_path / "hf", {"temperature": 0.6, "top_p": 0.8})
    manifest = build_engine(
        checkpoint, tmp_path / "e", dtype="float32", progress=False, generation_defaults={"temperature": 0.2}
    )
    assert manifest.generation_defaults == {"temperature": 0.2, "top_p": 0.8}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"temperature": -1}, "temperature must be in [0, 100]"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ],
)
def test_a_value_no_request_could_send_fails_the_build(
    tiny_gqa_dir: Path, tmp_path: Path, config: dict, message: str
) -> None:
    checkpoint = with_generation_config(tiny_gqa_dir, tmp_path / "hf", config)
    with pytest.raises(CheckpointError, match="generation") as caught:
        build_engine(checkpoint, tmp_path / "e", dtype="float32", progress=False)
    assert message in str(caught.value)
    assert not (tmp_path / "e").exists()


def test_manifest_checks_its_generation_defaults(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    build_engine(tiny_gqa_dir, tmp_path / "e", dtype="float32", progress=False)
    path = tmp_path / "e" / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data["generation_defaults"]  # an engine built before they were recorded
    path.write_text(json.dumps(data))
    assert EngineManifest.load(tmp_path / "e").generation_defaults == {}
    data["generation_defaults"] = {"temprature": 0.5}
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidEngineError, match="unknown field 'temprature'"):
        EngineManifest.load(tmp_path / "e")


def test_generation_config_defaults_reads_vllms_fields_only() -> None:
    assert generation_config_defaults({"max_new_tokens": 10.0, "top_k": 0, "temperature": 1}) == {
        "max_tokens": 10,
        "top_k": 0,
        "temperature": 1.0,
    }
    with pytest.raises(ValueError, match="must hold a JSON object"):
        generation_config_defaults([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_p must be a finite number"):
        generation_config_defaults({"top_p": True})


def test_default_model_records_its_model_card_sampling() -> None:
    # SmolLM2-135M-Instruct's model card samples with temperature 0.2, top_p 0.9
    assert default_model.DEFAULT_GENERATION_DEFAULTS == {"temperature": 0.2, "top_p": 0.9}


def test_default_engine_is_built_with_them_and_given_them_when_it_lacks_them(
    tiny_gqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny checkpoint stands in for the GGUF: what is under test is what the build records.
    monkeypatch.setattr(default_model, "fetch_default_gguf", lambda cache_dir=None: tiny_gqa_dir)
    builds: list[dict] = []

    def counted_build(*args: Any, **kwargs: Any) -> EngineManifest:
        builds.append(kwargs)
        return build_engine(*args, **kwargs)

    monkeypatch.setattr(default_model, "build_engine", counted_build)
    engine_dir = default_model.ensure_default_engine(tmp_path, progress=False)
    assert EngineManifest.load(engine_dir).generation_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert default_model.ensure_default_engine(tmp_path, progress=False) == engine_dir
    assert len(builds) == 1  # reused, not rebuilt

    data = json.loads((engine_dir / MANIFEST_NAME).read_text())
    del data["generation_defaults"]  # built by an older Kiln: it would sample at temperature 1
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(data))
    default_model.ensure_default_engine(tmp_path, progress=False)
    assert len(builds) == 1  # the weights are the same: only engine.json changes
    assert EngineManifest.load(engine_dir).generation_defaults == {"temperature": 0.2, "top_p": 0.9}
