"""benchmarks.frontend: the model-free engine keeps every engine rule but the model, and the run completes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks import frontend

ROOT = Path(__file__).resolve().parents[2]


def test_model_free_engine_takes_its_step_time_and_makes_every_token(tiny_gqa_dir):
    engine = frontend.model_free_engine(str(tiny_gqa_dir), step_s=0.02, max_num_seqs=4)
    tokens, seconds = frontend.offline(engine, frontend.prompts(4, 8), output_len=5)
    assert tokens == 4 * 5  # every request made its 5 tokens
    assert seconds >= 5 * 0.02  # one prefill step then 4 decode steps, each sleeping its step time
    assert engine.stats().kv_blocks_used == 0


def test_frontend_run_reports_served_beside_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the client child runs `python -m benchmarks.served`
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "frontend.json"
    args = ["--step-ms", "1", "--num-requests", "8", "--input-len", "6", "--output-len", "4"]
    assert frontend.main([*args, "--concurrency", "4", "--thread", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["engine"] == "thread" and row["served_output_tok_s"] > 0
    assert row["served_over_offline"] == row["served_output_tok_s"] / row["offline_output_tok_s"]
    # The engine's own view of each run: 8 requests of 4 tokens, at most 4 running.
    offline, served = row["offline_engine_steps"], row["served_engine_steps"]
    assert 1 < offline["mean_seqs"] <= 4 and 0 < served["mean_seqs"] <= 4
    # Served steps include the client's idle-TTFT requests before the load; its clock does not.
    assert 0 < offline["busy_fraction"] <= 1.01 and served["busy_fraction"] > 0
    assert offline["steps_per_s"] > 0 and served["steps_per_s"] > 0
    assert 0 < row["server_cpu_ms_per_request"] < 1000  # the server thread's CPU, read on that thread
    # CPU over the load's wall time; at this size the server's share is mostly the idle-TTFT requests
    # before the client's clock starts, so it may pass 1 here (on a real load they are ~1% of it).
    assert row["server_loop_busy"] > 0 and 0 < row["client_busy"] < 2


def test_loop_cpu_seconds_is_the_server_threads_own(tiny_gqa_dir):
    """Read on the server's loop thread: this thread burning CPU does not count, the server's work does."""
    from kiln.clients.thread import AsyncEngine
    from kiln.serve.background import loop_cpu_seconds, serve_in_background
    from kiln.serve.settings import ServerSettings

    engine = frontend.model_free_engine(str(tiny_gqa_dir), step_s=0.001, max_num_seqs=4)
    with serve_in_background(AsyncEngine(engine), ServerSettings(port=0, log_level="warning")) as (_, server):
        first = loop_cpu_seconds(server)
        spin = time.thread_time() + 0.3
        while time.thread_time() < spin:  # 0.3 s of this thread's CPU
            pass
        assert loop_cpu_seconds(server) - first < 0.15
