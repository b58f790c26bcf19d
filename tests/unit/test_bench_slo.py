"""benchmarks.slo on the tiny model: the bursty arrivals, both runs through the server, the report's format
(the plumbing, not the speed: a CPU run says nothing about the GPU claim)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import slo

ROOT = Path(__file__).resolve().parents[2]


def test_bursty_arrivals_alternate_rates_and_repeat_with_the_seed():
    times = slo.bursty_arrivals(100.0, calm_rate=1.0, burst_rate=20.0, calm_s=8.0, burst_s=2.0, seed=3)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 100.0
    assert times == slo.bursty_arrivals(100.0, 1.0, 20.0, 8.0, 2.0, seed=3)
    in_bursts = sum(1 for t in times if t % 10.0 >= 8.0)
    # 10 bursts of 2 s at 20/s against 10 calm stretches of 8 s at 1/s: ~400 against ~80.
    assert in_bursts > 3 * (len(times) - in_bursts)
    assert slo.bursty_arrivals(10.0, 0.0, 5.0, 5.0, 5.0, seed=0)[0] >= 5.0  # nothing arrives at rate 0


def test_both_runs_are_served_and_reported(tiny_gqa_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the client child runs `python -m benchmarks.slo`
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out, table = tmp_path / "slo.json", tmp_path / "slo.md"
    args = ["--model", str(tiny_gqa_dir), "--duration-s", "2", "--calm-rate", "4", "--burst-rate", "16"]
    args += ["--calm-s", "0.5", "--burst-s", "0.5", "--input-len-range", "20", "80"]
    args += ["--output-len-range", "4", "12", "--warmup-requests", "2", "--slo-interval-seconds", "0.1"]
    args += ["--slo-min-token-budget", "32", "--slo-min-num-seqs", "2", "--max-num-seqs", "8"]
    args += ["--max-num-batched-tokens", "128", "--num-kv-blocks", "256", "--no-load-progress"]
    args += ["--json", str(out), "--markdown", str(table)]  # the engine in its own process (the default)
    assert slo.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"fixed", "controller"}
    times, _, outputs = slo.workload(slo._parser().parse_args(args), vocab=1000)
    for result in report["runs"].values():
        assert result["requests"] == len(times) and result["completion_tokens"] == sum(outputs)
        assert set(result["meets"]) == {"itl", "ttft"}
        assert result["ttft_ms"]["p50"] <= result["ttft_ms"]["p99"]
    assert report["fixed_limits"] == {
        "admission_interval": 1,
        "max_num_batched_tokens": 128,
        "max_num_seqs": 8,
    }
    assert report["runs"]["fixed"]["limits"]["token_budget_min"] in (128, None)  # never moved
    assert "adjustments" in report["runs"]["controller"] and "adjustments" not in report["runs"]["fixed"]
    assert report["throughput_ratio"] == pytest.approx(
        report["runs"]["controller"]["output_tok_s"] / report["runs"]["fixed"]["output_tok_s"]
    )
    assert isinstance(report["claim_holds"], bool)
    text = table.read_text()
    assert text.startswith("| run | output tok/s |") and "| fixed |" in text and "| controller |" in text
    assert "Controller / fixed throughput" in text
    assert text in capsys.readouterr().out
