"""benchmarks.startup on a tiny shape: the random engine directory is valid and the timing child runs."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import startup
from kiln.engine_dir import EngineManifest

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def test_random_engine_dir_is_valid_and_start_is_timed(tmp_path, monkeypatch):
    import kiln.bench.workload

    monkeypatch.setitem(kiln.bench.workload.RANDOM_SHAPES, "tiny-test", ("float32", TINY))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    engine_dir = tmp_path / "engine"
    startup.write_random_engine("tiny-test", engine_dir, max_shard_bytes=20_000)
    manifest = EngineManifest.load(engine_dir, verify_checksums=True)
    assert len(manifest.weight_files) > 1  # sharded
    assert manifest.model.vocab_size == 300 and "tokenizer.json" in manifest.tokenizer_files
    times = startup.measure(engine_dir)
    assert 0 < times["start_to_ready_s"] <= times["start_to_first_token_s"]
