"""benchmarks.structured end to end on the CPU, at a toy shape: the GPU run's logic, not its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import structured
from kiln.bench import workload

TOY_SHAPE = (
    "float32",
    {
        "vocab_size": 600,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
)


def test_free_and_constrained_runs_side_by_side(
    tiny_gqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(workload.RANDOM_SHAPES, "toy", TOY_SHAPE)
    out = tmp_path / "structured.json"
    argv = [
        str(tiny_gqa_dir),
        "--shape",
        "toy",
        "--num-requests",
        "6",
        "--input-len",
        "8",
        "--schema",
        "verdict",
    ]
    profile = tmp_path / "profile.txt"
    argv += ["--output-len", "40", "--repeats", "2", "--json", str(out), "--profile", str(profile)]
    argv += ["--fill-threads", "2", "1"]
    assert structured.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["compile"]["compile_ms"]) == set(structured.SCHEMAS)
    runs = result["throughput"]
    free, same, held = runs["free"], runs["free_same_lengths"], runs["schema"]
    assert free["output_tokens"] == 6 * 40  # free requests ignore EOS: every one runs to max_tokens
    # Each completed by its schema, so each was parsed and validated (a bad one raises).
    assert held["completed_by_schema"] == 6 and held["mean_output_len"] <= 12
    # The like-for-like control produced exactly as many tokens as the constrained run.
    assert same["output_tokens"] == held["output_tokens"]
    # The constrained run with each filling thread count; the first one's is the ratio's.
    assert (
        result["fill_threads"] == [2, 1]
        and runs["schema_threads_1"]["output_tokens"] == held["output_tokens"]
    )
    assert result["throughput_ratio"] == held["output_tok_per_s"] / same["output_tok_per_s"]
    # The best constrained run against its own twin, which is the control of the same repeat.
    by_repeat = result["throughput_ratio_by_repeat"]
    assert len(by_repeat) == 2 and result["throughput_ratio"] in by_repeat
    i, tok_per_s = by_repeat.index(result["throughput_ratio"]), result["throughput_runs_tok_per_s"]
    assert tok_per_s["schema"][i] == max(tok_per_s["schema"])
    assert tok_per_s["free_same_lengths"][i] == round(same["output_tok_per_s"])
    assert result["throughput_ratio_vs_full_length"] == held["output_tok_per_s"] / free["output_tok_per_s"]
    # Host time per phase, over as many steps as the longest output took (prefill included).
    for run in (held, same):
        assert run["steps"] >= run["mean_output_len"] > 0
        assert {"step", "schedule", "collect", "advance_matchers"} <= set(run["phase_ms_per_step"])
    assert "tokens in" in profile.read_text() and "function calls" in profile.read_text()
    assert result["batch1"]["free"]["tokens"] == 40 and 2 <= result["batch1"]["schema"]["tokens"] <= 12
