"""benchmarks.startup on a tiny shape: the random engine directory is valid and the timing child runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

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
    profile = tmp_path / "imports.txt"
    times = startup.measure(engine_dir, import_profile=profile)
    assert 0 < times["start_to_ready_s"] <= times["start_to_first_token_s"]
    assert times["imports_s"] == pytest.approx(times["interpreter_s"] + times["engine_import_s"])
    assert 0 < times["interpreter_s"] < times["imports_s"]
    assert "| kiln.engine.llm_engine" in profile.read_text()  # the child's -X importtime report


def test_warm_start_times_a_real_kiln_serve_to_health_ready_and_first_token(tmp_path):
    from benchmarks import warm_start
    from kiln.build import build_tiny_engine

    engine_dir = tmp_path / "tiny"
    build_tiny_engine(engine_dir, seed=0)
    runs = [warm_start.measure(str(engine_dir))]
    run = runs[0]
    assert 0 < run["health_s"] <= run["ready_s"] <= run["first_token_s"]
    assert run["phases"]["model loaded"] > 0  # the server's own log line
    table = warm_start.markdown(runs, "python -m benchmarks.warm_start --model DIR")
    assert "| median |" in table and "ready in <= 3 s" in table
    out = tmp_path / "results.json"
    warm_start._append_json(out, runs, "tiny", "cmd")
    rows = json.loads(out.read_text())["results"]
    assert {(r["shape"], r["metric"]) for r in rows} >= {
        ("tiny median", "ready_s"),
        ("tiny run 1", "health_s"),
    }


def test_loading_only_needs_a_gpu(tmp_path, monkeypatch, capsys):
    import kiln.bench.workload

    monkeypatch.setitem(kiln.bench.workload.RANDOM_SHAPES, "tiny-test", ("float32", TINY))
    engine_dir = tmp_path / "engine"
    startup.write_random_engine("tiny-test", engine_dir)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        startup.main(["--dir", str(engine_dir), "--loading-only"])
    assert "--loading-only compares copies to a CUDA device" in capsys.readouterr().err


def test_engine_knobs_reach_the_children_and_name_their_runs(tmp_path, monkeypatch, capsys):
    import kiln.bench.workload

    monkeypatch.setitem(kiln.bench.workload.RANDOM_SHAPES, "tiny-test", ("float32", TINY))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    engine_dir = tmp_path / "engine"
    startup.write_random_engine("tiny-test", engine_dir)
    out = tmp_path / "results.json"
    argv = ["--dir", str(engine_dir), "--repeats", "1", "--out", str(out)]
    assert startup.main([*argv, "--max-num-seqs", "3"]) == 0
    # Not the default's name: the report's start-to-ready target reads only runs at the defaults.
    assert {row["name"] for row in json.loads(out.read_text())["results"]} == {
        "kiln/startup_empty_cache[max_num_seqs=3]"
    }
    # The child opens the engine with the knobs: one 16-token block cannot hold its 128-token prompt.
    with pytest.raises(subprocess.CalledProcessError):
        startup.measure(engine_dir, knobs={"num_kv_blocks": 1})
    with pytest.raises(SystemExit):
        startup.main([*argv, "--prefill-graph-tokens", "9000"])
    assert "prefill_graph_tokens must be <= 8191" in capsys.readouterr().err
