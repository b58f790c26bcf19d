"""benchmarks.engine_host: only the model is stubbed; every step samples ordinary text and the run reports."""

from __future__ import annotations

import json

from benchmarks import engine_host
from benchmarks.frontend import VOCAB_HIGH, VOCAB_LOW
from kiln.engine.sampling_params import SamplingParams


def test_stubbed_model_engine_runs_the_real_step_with_text_tokens(tiny_gqa_dir):
    engine = engine_host.stubbed_model_engine(str(tiny_gqa_dir), max_num_seqs=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", params=params, prompt_token_ids=[VOCAB_LOW + i] * 9)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert sorted(outputs) == ["r0", "r1", "r2"]
    for tokens in outputs.values():
        assert len(tokens) == 6 and all(VOCAB_LOW <= t < VOCAB_HIGH for t in tokens)
    assert engine.stats().kv_blocks_used == 0


def test_engine_host_reports_a_time_per_running_count(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert engine_host.main(["--running", "2", "4", "--steps", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["shape"] for r in rows] == ["2 running", "4 running"]
    assert all(r["metric"] == "ms" and r["value"] > 0 for r in rows)
    assert "4 running" in capsys.readouterr().out
