"""The load generator (`kiln.bench.client`, `kiln bench --url`) against a live server on the tiny model."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from server_harness import LiveServer

from kiln.bench.cli import main as bench_main
from kiln.bench.client import arrival_times, run_client, run_load


def test_arrival_times_are_a_seeded_poisson_process():
    assert arrival_times(4, math.inf) == [0.0] * 4
    times = arrival_times(2000, 50.0, seed=3)
    assert times == arrival_times(2000, 50.0, seed=3) and times != arrival_times(2000, 50.0, seed=4)
    assert times[0] == 0.0 and times == sorted(set(times))
    assert times[-1] / 1999 == pytest.approx(1 / 50.0, rel=0.1)  # mean gap 1/rate
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)


def test_a_request_rate_spreads_the_load(server: LiveServer):
    prompts = [[10 + i, 11, 12] for i in range(8)]
    result = run_load(run_client(server.url, "tiny", prompts, 3, concurrency=4, request_rate=20.0, seed=1))
    assert result["completion_tokens"] == 8 * 3 and result["request_rate"] == 20.0
    assert result["wall_s"] >= arrival_times(8, 20.0, seed=1)[-1]  # the last one left no earlier
    assert result["ttft_ms"]["p50"] > 0 and result["idle_ttft_ms"] > 0


def test_the_client_reads_each_stream_to_its_end_and_reuses_the_connection():
    """A server that ends the body a moment after [DONE] (as a loaded one does): a client that stopped
    reading at [DONE] would drop the connection and open one per request, timing the server's accept."""
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        await response.write(b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n')
        await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    async def load() -> dict:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await run_client(f"http://127.0.0.1:{port}", "m", [[1, 2]] * 8, 1, concurrency=2)
        finally:
            await runner.cleanup()

    result = run_load(load())
    assert result["completion_tokens"] == 8
    assert result["connections"] <= 2  # 6 probes one at a time, then 8 requests at most 2 at a time
    assert result["e2e_ms"]["p50"] < 50  # the end of the stream is [DONE], not the end of the body


def test_kiln_bench_url_measures_a_running_server(server: LiveServer, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["--url", f"{server.url}/v1", "--num-requests", "6", "--input-len", "5", "--output-len", "4"]
    assert bench_main([*args, "--concurrency", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("tiny at ") and "output tok/s" in printed and "idle TTFT" in printed
    rows = json.loads(out.read_text())["results"]
    metrics = {r["metric"] for r in rows}
    assert {"output_tok_per_s", "ttft_ms_p50", "itl_ms_p99", "e2e_ms_p90"} <= metrics
    assert all(r["params"]["request_rate"] is None for r in rows)


def test_kiln_bench_url_reports_a_server_that_is_not_there(capsys):
    assert bench_main(["--url", "http://127.0.0.1:9", "--num-requests", "1"]) == 1
    assert "did not answer as an OpenAI API" in capsys.readouterr().err


def test_served_bench_reports_both_passes_and_the_engines_steps(tiny_gqa_dir, tmp_path, capsys):
    """benchmarks.served end to end on the tiny model (CPU): warm-up, offline, then the same workload served
    by an engine process to a client process; its JSON row and the engine's step totals."""
    from benchmarks.served import main as served_main

    out = tmp_path / "results.json"
    args = ["--model", str(tiny_gqa_dir), "--num-requests", "6", "--input-len", "8", "--output-len", "4"]
    assert (
        served_main(
            [*args, "--concurrency", "3", "--max-num-seqs", "4", "--engine-process", "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    served = json.loads(printed[printed.index("{") :])
    assert served["completion_tokens"] == 6 * 4
    for key in ("engine_steps", "offline_engine_steps"):
        steps = served[key]
        assert steps["steps_per_s"] > 0 and 1 <= steps["mean_seqs"] <= 4 and steps["mean_tokens"] >= 1
    rows = json.loads(out.read_text())["results"]
    assert {r["metric"] for r in rows} >= {
        "served_output_tok_s",
        "offline_output_tok_s",
        "served_over_offline",
    }
