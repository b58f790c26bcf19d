"""benchmarks.prefill on the tiny model: the FLOP count, the rows and the table (the plumbing, not the
speed: a CPU run says nothing about the GPU's share of its ceiling)."""

from __future__ import annotations

import json

import pytest

from benchmarks import prefill
from kiln.config import ModelConfig


def test_prefill_flops_count_projections_causal_attention_and_one_lm_head_row():
    config = ModelConfig(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=64,
    )
    # per layer: q 8x8, k and v 8x4 each, o 8x8, gate/up/down 8x16 each = 64 + 64 + 64 + 384 = 576
    projections = 2 * 10 * 2 * 576
    attention = 2 * 2 * 10 * 10 * 8
    assert prefill.prefill_flops(config, 10) == projections + attention + 2 * 8 * 100


def test_rows_and_table_on_the_tiny_model(tiny_gqa_dir, tmp_path, capsys):
    out, table = tmp_path / "prefill.json", tmp_path / "prefill.md"
    args = ["--model", str(tiny_gqa_dir), "--lengths", "48", "16", "--repeats", "1", "--ceiling-size", "64"]
    args += ["--num-kv-blocks", "64", "--no-load-progress", "--json", str(out), "--markdown", str(table)]
    args += ["--profile", str(tmp_path / "profiles")]
    assert prefill.main(args) == 0
    results = json.loads(out.read_text())["results"]
    ceiling = [r for r in results if r["name"] == "kiln/matmul_ceiling"]
    assert len(ceiling) == 1 and ceiling[0]["value"] > 0
    ttft = {r["shape"]: r["value"] for r in results if r["name"] == "kiln/prefill_ttft"}
    assert sorted(ttft) == [f"{tiny_gqa_dir.name} 16 tokens", f"{tiny_gqa_dir.name} 48 tokens"]
    assert all(v > 0 for v in ttft.values())
    share = {r["shape"]: r["value"] for r in results if r["name"] == "kiln/prefill_share"}
    tflops = {r["shape"]: r["value"] for r in results if r["name"] == "kiln/prefill_tflops"}
    for shape, value in share.items():
        assert value == pytest.approx(tflops[shape] / ceiling[0]["value"])
    assert all(r["params"]["max_num_batched_tokens"] == 48 for r in results)  # the longest prompt: one step
    # The 48-token prompts begin with the 16-token ones (same seeds): only a cache that is off computes them whole.
    assert all(r["params"]["prefix_cache_hits"] == 0 for r in results)
    for length in (16, 48):  # one profile a length, its prompt's wall time and op table
        profile = (tmp_path / "profiles" / f"prefill-{length}.txt").read_text()
        assert f"one prompt of {length} tokens" in profile and "aten::" in profile
    text = table.read_text()
    assert "| prompt tokens | TTFT, ms | TFLOP/s | share of the ceiling |" in text
    assert text.index("| 16 |") < text.index("| 48 |") and text in capsys.readouterr().out


def test_the_ceiling_is_the_faster_of_its_timings_before_and_after_the_prompts(
    tiny_gqa_dir, monkeypatch, tmp_path
):
    timings = iter([300.0, 400.0])
    monkeypatch.setattr(prefill, "matmul_tflops", lambda *_: next(timings))
    out = tmp_path / "prefill.json"
    args = ["--model", str(tiny_gqa_dir), "--lengths", "16", "--repeats", "1", "--num-kv-blocks", "64"]
    assert prefill.main([*args, "--no-load-progress", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["value"] for r in results if r["name"] == "kiln/matmul_ceiling"] == [400.0]
    tflops = next(r["value"] for r in results if r["name"] == "kiln/prefill_tflops")
    assert next(r["value"] for r in results if r["name"] == "kiln/prefill_share") == pytest.approx(
        tflops / 400
    )


def test_a_prompt_longer_than_the_engine_takes_is_refused(tiny_gqa_dir, capsys):
    with pytest.raises(SystemExit):
        prefill.main(["--model", str(tiny_gqa_dir), "--lengths", "100000", "--no-load-progress"])
    assert "takes prompts of at most" in capsys.readouterr().err
