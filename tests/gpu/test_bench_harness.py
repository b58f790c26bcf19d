"""`kiln bench` (kiln.bench) on the CPU with the tiny checkpoint: the harness's own logic, not speed.

These run everywhere (no GPU needed): they check request counts, token accounting, the JSON rows
and the preset shapes, so a broken harness is caught before it costs GPU time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from kiln.bench import cli, offline, profile, workload
from kiln.bench.workload import request_lengths
from kiln.config import EngineConfig, ModelConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.models.weights import expected_packed_shapes


@pytest.fixture(scope="module")
def tiny_engine(tiny_gqa_dir):
    return LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", max_num_seqs=8))


def test_throughput_counts_every_generated_token(tiny_engine):
    result = offline.run_throughput(tiny_engine, 5, [7, 3, 12, 5, 9], [4, 6, 2, 5, 3])
    assert result.num_requests == 5
    assert result.input_tokens == 36
    assert result.output_tokens == 20  # ignore_eos: each request makes exactly its output length
    assert result.output_tok_per_s == pytest.approx(20 / result.elapsed_s)
    assert result.kernel_compiles == 0  # on CPU no Triton kernel is built
    assert not tiny_engine.has_unfinished_requests()


def test_throughput_counts_the_kernel_variants_its_timed_pass_built(tiny_engine, monkeypatch):
    # An engine that built one variant a step: the result counts the timed pass's steps, not the warm-up's.
    stats = tiny_engine.stats
    monkeypatch.setattr(
        tiny_engine, "stats", lambda: dataclasses.replace(stats(), kernel_compiles=stats().num_steps)
    )
    offline.warm_up(tiny_engine, 3, [5, 5, 5], [4, 4, 4])
    before = tiny_engine.stats().num_steps
    result = offline.run_throughput(tiny_engine, 3, [5, 5, 5], [4, 4, 4], warm=False)
    assert result.kernel_compiles == tiny_engine.stats().num_steps - before > 0


def test_the_timed_pass_logs_each_variant_built_after_the_warm_up(tiny_engine, monkeypatch):
    events: list[str] = []

    class Watch:
        def warn_from_now(self) -> None:
            events.append("warn")

    add_request = tiny_engine.add_request
    monkeypatch.setattr(offline, "compile_watch", lambda: Watch())
    monkeypatch.setattr(
        tiny_engine,
        "add_request",
        lambda request_id, **kw: events.append(request_id) or add_request(request_id, **kw),
    )
    offline.run_throughput(tiny_engine, 2, [5, 5], [3, 3])
    assert events == ["warmup0", "warmup1", "warn", "r0", "r1"]


def test_throughput_warms_up_at_the_workloads_shapes(tiny_engine, monkeypatch):
    # As many requests as run at once (max_num_seqs 8), the workload's first prompt lengths, at most 16
    # tokens out; none of them counted.
    added = []
    add_request = tiny_engine.add_request

    def recording(request_id, *, prompt_token_ids, params):
        added.append((request_id, len(prompt_token_ids), params.max_tokens))
        return add_request(request_id, prompt_token_ids=prompt_token_ids, params=params)

    monkeypatch.setattr(tiny_engine, "add_request", recording)
    result = offline.run_throughput(tiny_engine, 10, [7] * 5 + [3] * 5, [20] * 5 + [4] * 5)
    assert [a for a in added if a[0].startswith("warmup")] == [
        (f"warmup{i}", 7 if i < 5 else 3, 16 if i < 5 else 4) for i in range(8)
    ]
    assert len(added) == 18 and result.output_tokens == 5 * 20 + 5 * 4
    added.clear()
    offline.run_throughput(tiny_engine, 2, [5, 5], [3, 3], warm=False)
    assert [a[0] for a in added] == ["r0", "r1"]


def test_latency_measures_one_request(tiny_engine):
    result = offline.run_latency(tiny_engine, input_len=10, output_len=6, repeats=2)
    assert result.output_len == 6
    assert result.ttft_ms > 0 and result.ms_per_token > 0


def test_sampled_lengths_stay_in_range():
    lengths = request_lengths(50, 128, (3, 9), seed=1)
    assert len(lengths) == 50 and min(lengths) >= 3 and max(lengths) <= 9 and len(set(lengths)) > 1
    assert request_lengths(3, 128, None, seed=1) == [128, 128, 128]


def test_main_writes_json_rows(tiny_gqa_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = [str(tiny_gqa_dir), "--num-requests", "4", "--input-len", "6", "--output-len", "3"]
    assert cli.main([*argv, "--max-num-seqs", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == ["kiln/offline_throughput", "kiln/batch1_decode", "kiln/ttft"]
    assert rows[0]["params"]["output_tokens"] == 12
    assert rows[0]["note"].startswith("kiln bench ")
    assert "output tok/s" in capsys.readouterr().out


def test_main_needs_exactly_one_model_source(tiny_gqa_dir):
    assert cli.main([]) == 2
    assert cli.main([str(tiny_gqa_dir), "--random", "llama2-7b"]) == 2


@pytest.mark.parametrize(
    ("shape", "params_billion", "kv_heads"), [("llama2-7b", 6.74, 32), ("llama3.1-8b", 8.03, 8)]
)
def test_random_shapes_are_the_real_architectures(shape, params_billion, kv_heads):
    _, hf = workload.RANDOM_SHAPES[shape]
    config = ModelConfig.from_hf({"model_type": "llama", **hf})
    total = sum(_numel(s) for s in expected_packed_shapes(config).values())
    assert total / 1e9 == pytest.approx(params_billion, abs=0.01)
    assert config.num_key_value_heads == kv_heads


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def test_profile_reports_phases(tiny_gqa_dir, tmp_path):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", max_num_seqs=4))
    report = tmp_path / "profile.txt"
    summary = profile.profile_steps(engine, 4, 8, 12, num_steps=5, path=report)
    assert summary["step_ms"] > 0
    phases = {"host_ms_schedule", "host_ms_prepare_inputs", "host_ms_sampler", "host_ms_outputs.process"}
    assert phases <= set(summary)
    assert all(summary[name] > 0 for name in phases)  # each phase ran and was timed on the host
    text = report.read_text()
    assert "wall per step" in text and "model.forward" in text
    assert not engine.has_unfinished_requests()


def test_profile_begins_after_the_steps_asked(tiny_gqa_dir, tmp_path):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", max_num_seqs=4))
    report = tmp_path / "profile.txt"
    summary = profile.profile_steps(engine, 4, 8, 12, num_steps=2, path=report, after_steps=6)
    # One step prefills all four prompts and samples each one's first token; five more add one each.
    assert summary["running_at_start"] == 4
    assert summary["mean_tokens_at_start"] == 8 + 6
    assert "after 6 steps" in report.read_text()
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("flags", [["--profile-after", "5"], ["--profile", "p.txt", "--profile-after", "-1"]])
def test_profile_after_needs_profile_and_a_count(flags, capsys):
    assert cli.main(["--random", "llama2-7b", *flags]) == 2
    assert "--profile-after" in capsys.readouterr().err


def test_profile_first_token_reports_one_prompt(tiny_gqa_dir, tmp_path):
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", async_scheduling=True))
    report = tmp_path / "ttft.txt"
    summary = profile.profile_first_token(engine, 16, report)
    assert summary["wall_ms"] > 0 and summary["gpu_busy_ms"] == 0  # CPU: no kernels on a device
    text = report.read_text()
    assert text.startswith("one prompt of 16 tokens") and "aten::" in text
    assert not engine.has_unfinished_requests()


def _load_bench_report():
    # benchmarks/ is a folder of scripts run from the repository root, not an installed package.
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_shows_only_measured_rows(tmp_path):
    report = _load_bench_report()

    rows = [
        {"suite": "kiln", "name": "kiln/batch1_decode", "shape": "llama2-7b batch 1, 128 in / 128 out",
         "metric": "ms_per_token", "value": 6.5, "params": {}, "note": ""},
        {"suite": "hf", "name": "hf/generate_eager", "shape": "llama2-7b batch 1, 128 in / 64 out",
         "metric": "ms_per_token", "value": 30.0, "params": {}, "note": ""},
        {"suite": "kernels", "name": "decode_attention/triton_graph", "shape": "B=1", "metric": "us",
         "value": 13.0, "params": {}, "note": ""},
        {"suite": "kernels", "name": "decode_attention/torch_sdpa_contiguous_graph", "shape": "B=1",
         "metric": "us", "value": 12.5, "params": {}, "note": ""},
        {"suite": "kiln", "name": "kiln/batch1_decode", "shape": "llama2-7b fp8 batch 1, 128 in / 128 out",
         "metric": "ms_per_token", "value": 1.8, "params": {}, "note": ""},
        {"suite": "prefill", "name": "kiln/prefill_share", "shape": "llama3.1-8b 32768 tokens",
         "metric": "ratio", "value": 0.825, "params": {}, "note": ""},
        {"suite": "kernels", "name": "prefill_attention/triton", "shape": "1x8192", "metric": "TFLOP_per_s",
         "value": 364.0, "params": {}, "note": ""},
        {"suite": "kernels", "name": "prefill_attention/sdpa_cudnn_contiguous", "shape": "1x8192",
         "metric": "TFLOP_per_s", "value": 556.0, "params": {}, "note": ""},
    ]  # fmt: skip
    served = [
        {"suite": "served", "name": "kiln/served", "shape": "llama3.1-8b 1024x128/128",
         "metric": "served_over_offline", "value": value, "params": {}, "note": ""}
        for value in (0.95, 0.85)
    ] + [
        {"suite": "startup", "name": "kiln/startup_engine_kernels", "shape": "llama2-7b run 1",
         "metric": "start_to_ready_s", "value": 19.0, "params": {}, "note": ""},
    ]  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"device": {"gpu": "Test GPU"}, "results": rows + served[:1]}))
    second = tmp_path / "r2.json"  # a second run: both of its figures stay in the targets table
    second.write_text(json.dumps({"device": {"gpu": "Test GPU"}, "results": served[1:]}))
    loaded, devices = report.load([path, second])
    text = report.markdown(loaded, devices)
    assert (
        "| 16 | served over HTTP/SSE / offline, same workload (benchmarks.served) | 0.950, 0.850 | – | >= 0.95 "
        "| not in every run |" in text
    )
    assert "| 16 | start-to-ready, Llama-2-7B engine dir with kernels/, s | 19.00 | – | <= 8 | no |" in text
    assert "| kiln/served | llama3.1-8b 1024x128/128 | served_over_offline | 0.850 |" in text  # the last run
    assert "Test GPU" in text
    # The fp16 and FP8 rows share a model and a metric: each target finds its own by the shape's prefix.
    assert (
        "| 16 | batch-1 decode, Llama-2-7B fp16, ms/token | 6.50 | generate_eager 30.00 | <= 3.5 | no |"
        in text
    )
    assert "| 16 | batch-1 decode, Llama-2-7B FP8, ms/token | 1.80 | – | <= 1.9 | yes |" in text
    assert "| 16 | batch-1 decode, Llama-2-7B INT8 weight-only, ms/token | not measured | – |" in text
    assert "| 16 | offline, Llama-3.1-8B bf16, 1024 x 128/128, output tok/s | not measured | – |" in text
    assert (
        "| 16 | prefill of 32,768 tokens, Llama-3.1-8B bf16, share of the matmul ceiling | 0.825 | – | >= 0.85 | no |"
        in text
    )
    assert (
        "| 16 | prefill of 1,024 tokens, Llama-3.1-8B bf16, share of the matmul ceiling | not measured |"
        in text
    )
    assert "| kiln/prefill_share | llama3.1-8b 32768 tokens | ratio | 0.825 |" in text
    assert "| B=1 | 13.00 | 12.50 |" in text
    assert "| 1x8192 | 364 | 556 |" in text
    pytest.importorskip("matplotlib")
    assert report.plot(loaded, tmp_path / "plots.png")
    assert (tmp_path / "plots.png").stat().st_size > 1000
