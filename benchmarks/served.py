"""Served throughput: one workload offline and through the HTTP/SSE server, side by side.

    python -m benchmarks.served --random llama3.1-8b --num-requests 1024 --input-len 128 --output-len 128 \\
        --concurrency 256 --out results.json
    python -m benchmarks.served --model ENGINE_OR_HF_DIR ...      # a real model instead of random weights

Rules of the measurements:
- The engine (native, random weights at a preset shape or a model dir) first runs a warm-up at the
  workload's shapes, then the workload offline (`kiln.bench.offline.run_throughput`), then serves it:
  the OpenAI server runs in this process and the load comes from a separate client process, so the
  load generator never competes with the engine for the GIL.
- The client is `kiln.bench.client` (its docstring has the rules of the measurement): streamed
  completions, at most `--concurrency` in flight, arriving all at once or at `--request-rate` per
  second (Poisson); throughput, TTFT, inter-token and end-to-end p50/p90/p99, idle TTFT.
- Beside them, the engine's view (`engine_steps`: steps per second, mean sequences and tokens a step,
  busy fraction) and where each request's time went on average (`request_phases_ms`, from the server's
  `kiln_request_<phase>_time_seconds` histograms: intake, queue, prefill, decode).
- Who set the pace: `server_loop_busy` is the CPU time of the server's event-loop thread over the
  client's wall time (the client's idle-TTFT requests included), `client_busy` the client process's
  own (kiln.bench.client). Either near 1.0 means that one Python thread, not the engine, was the limit.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.bench.client import percentiles, run_client, run_load
from kiln.bench.workload import add_engine_arguments, engine_config

if TYPE_CHECKING:
    from kiln.engine.info import EngineStats

__all__ = ["main", "percentiles", "run_client"]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", choices=["llama2-7b", "llama3.1-8b"])
    p.add_argument("--model")
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)"
    )
    # The engine's knobs, generated from EngineConfig; with --engine-process (as kiln serve) the server's
    # engine is a ProcessEngine built with the same configuration once the offline engine is freed.
    add_engine_arguments(p)
    p.add_argument("--out", type=Path)
    p.add_argument("--client", help=argparse.SUPPRESS)  # URL: run as the load-generating child process
    p.add_argument("--served-model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    prompts_seed = 1

    if args.client:
        prompts = _prompts(args.num_requests, args.input_len, args.vocab, prompts_seed)
        result = run_load(
            run_client(
                args.client, args.served_model, prompts, args.output_len, args.concurrency, args.request_rate
            )
        )
        print(json.dumps(result))
        return 0

    import torch

    from kiln.bench.offline import run_throughput, warm_up
    from kiln.bench.workload import build_random_engine
    from kiln.clients.process import ProcessEngine
    from kiln.clients.thread import AsyncEngine
    from kiln.engine.llm_engine import LLMEngine
    from kiln.engine.process_setup import prepare_process
    from kiln.serve.background import loop_cpu_seconds, serve_in_background
    from kiln.serve.settings import ServerSettings

    if (args.random is None) == (args.model is None):
        p.error("give exactly one of --random SHAPE or --model DIR")
    try:
        config = engine_config(args)
    except ValueError as exc:
        p.error(str(exc))
    if args.random:
        factory = functools.partial(build_random_engine, args.random, config)
    else:
        factory = functools.partial(LLMEngine.from_path, args.model, config)
    engine = factory()
    prepare_process(engine.config)
    max_num_seqs = engine.config.max_num_seqs
    vocab = engine.model_config.vocab_size
    n, inp, out = args.num_requests, args.input_len, args.output_len
    # Warm-up at the workload's own shapes, so a machine whose Triton cache is cold compiles here rather
    # than inside the timed offline pass (whose step counters are read around it).
    warm_up(engine, n, [inp] * n, [out] * n, seed=prompts_seed)
    before = engine.stats()
    offline = run_throughput(engine, n, [inp] * n, [out] * n, seed=prompts_seed, warm=False)
    offline_steps = step_totals(before, engine.stats(), offline.elapsed_s)
    offline_tok_s = offline.output_tokens / offline.elapsed_s
    kv_blocks = engine.model_info.extra["num_kv_blocks"]
    print(f"offline: {offline_tok_s:,.0f} output tok/s ({kv_blocks} KV blocks)", flush=True)

    name = engine.model_info.name
    if args.engine_process:
        # The child builds its own engine with the same configuration: give it the memory the offline
        # one held.
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        server_engine = ProcessEngine(factory)
    else:
        server_engine = AsyncEngine(engine)
    settings = ServerSettings(
        port=0, log_level="warning", max_waiting_sequences=None, max_waiting_tokens=None
    )
    with serve_in_background(server_engine, settings) as (url, server):
        before, phases_before = server_engine.stats(), scrape_metrics(url)
        loop_cpu_before = loop_cpu_seconds(server)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.served",
            "--client",
            url,
            "--served-model",
            name,
            "--vocab",
            str(vocab),
        ]
        cmd += ["--num-requests", str(n), "--input-len", str(inp), "--output-len", str(out)]
        cmd += ["--concurrency", str(args.concurrency), "--request-rate", str(args.request_rate)]
        served = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        served["server_loop_busy"] = (loop_cpu_seconds(server) - loop_cpu_before) / served["wall_s"]
        # The engine's own view: how many steps it ran and at what batch (the client's wall clock).
        served["engine_steps"] = step_totals(before, server_engine.stats(), served["wall_s"])
        # Where the time to first token went, per request on average (the server's own histograms).
        served["request_phases_ms"] = phase_means(phases_before, scrape_metrics(url))
    served["offline_output_tok_s"] = offline_tok_s
    served["kv_blocks"] = kv_blocks
    served["offline_engine_steps"] = offline_steps
    served["served_over_offline"] = served["output_tok_s"] / offline_tok_s
    print(json.dumps(served, indent=1))
    if args.out:
        _append(args.out, args, served, max_num_seqs)
    return 0


def step_totals(before: EngineStats, after: EngineStats, seconds: float) -> dict[str, float]:
    """Steps per second, mean sequences and tokens per step between two EngineStats, and the share of
    `seconds` the engine spent in steps (served: what throughput loses to an engine left idle by the front
    end, apart from what it loses to smaller batches; the client's few idle-TTFT requests before the load
    count in the steps but not in the seconds), and the Triton kernel variants the engine built meanwhile
    with their seconds (each stalled every stream: a warmed-up engine builds none)."""
    steps = max(1, after.num_steps - before.num_steps)
    return {
        "steps_per_s": steps / seconds,
        "mean_seqs": (after.num_step_seqs - before.num_step_seqs) / steps,
        "mean_tokens": (after.num_step_tokens - before.num_step_tokens) / steps,
        "busy_fraction": (after.busy_seconds - before.busy_seconds) / seconds,
        "kernel_compiles": after.kernel_compiles - before.kernel_compiles,
        "kernel_compile_s": after.kernel_compile_seconds - before.kernel_compile_seconds,
    }


PHASES = ("intake", "queue", "prefill", "decode")  # kiln.serve.metrics: kiln_request_<phase>_time_seconds


def scrape_metrics(url: str) -> str:
    """The server's /metrics text."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        return response.read().decode()


def phase_means(before: str, after: str) -> dict[str, float | None]:
    """Each request phase's mean in ms over the engine requests that finished between two /metrics
    scrapes (None: none recorded that phase)."""
    from prometheus_client.parser import text_string_to_metric_families

    def totals(text: str) -> dict[str, float]:
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.endswith(("_time_seconds_sum", "_time_seconds_count"))
        }

    b, a = totals(before), totals(after)
    means: dict[str, float | None] = {}
    for phase in PHASES:
        name = f"kiln_request_{phase}_time_seconds"
        count = a.get(f"{name}_count", 0.0) - b.get(f"{name}_count", 0.0)
        total = a.get(f"{name}_sum", 0.0) - b.get(f"{name}_sum", 0.0)
        means[phase] = 1000 * total / count if count else None
    return means


def _append(path: Path, args: argparse.Namespace, served: dict[str, Any], max_num_seqs: int) -> None:
    import torch

    shape = f"{args.random or args.model} {args.num_requests}x{args.input_len}/{args.output_len}"
    params = {
        "concurrency": args.concurrency,
        "max_num_seqs": max_num_seqs,
        "engine_process": args.engine_process,
        "admission_interval": args.admission_interval,
        "piecewise_graphs": args.piecewise_graphs,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
    }
    rows = [
        ("served_output_tok_s", served["output_tok_s"]),
        ("offline_output_tok_s", served["offline_output_tok_s"]),
        ("served_over_offline", served["served_over_offline"]),
        ("idle_ttft_ms", served["idle_ttft_ms"]),
        ("server_loop_busy", served["server_loop_busy"]),
        ("client_busy", served["client_busy"]),
        ("kernel_compiles", served["engine_steps"]["kernel_compiles"]),
    ]
    rows += [
        (f"{m}_{q}", served[m][q]) for m in ("ttft_ms", "itl_ms", "e2e_ms") for q in ("p50", "p90", "p99")
    ]
    data: dict[str, Any] = {"device": {}, "results": []}
    if path.exists():
        data = json.loads(path.read_text())
    if torch.cuda.is_available():
        data["device"].setdefault("gpu", torch.cuda.get_device_name(0))
    note = "python -m benchmarks.served " + " ".join(sys.argv[1:])
    for metric, value in rows:
        data["results"].append(
            {
                "suite": "served",
                "name": "kiln/served",
                "shape": shape,
                "metric": metric,
                "value": value,
                "params": params,
                "note": note,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
