"""Served throughput: one workload offline and through the HTTP/SSE server, side by side.

    python -m bench.served --random llama3.1-8b --num-requests 1024 --input-len 128 --output-len 128 \\
        --concurrency 256 --out results.json
    python -m bench.served --model ENGINE_OR_HF_DIR ...      # a real model instead of random weights

Rules of the measurements:
- The engine (native, random weights at a preset shape or a model dir) first runs the workload offline
  (`kiln.bench.run_throughput`), then serves it: the OpenAI server runs in this process and the load
  comes from a separate client process, so the load generator never competes with the engine for the GIL.
- The client streams `/v1/completions` with token-id prompts, greedy, `ignore_eos`, `include_usage`, at
  most `--concurrency` requests in flight. Throughput = completion tokens (from usage) / wall time of the
  whole load. TTFT = request sent -> first non-empty text chunk; inter-token latency = gaps between text
  chunks; end-to-end = request sent -> `[DONE]`; reported as p50/p90/p99 in milliseconds.
- Idle TTFT: a 128-token prompt on the otherwise idle server, the median of 5 after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


# -- the client process ------------------------------------------------------------------------------
async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                chunk_times.append(time.perf_counter())
    done = time.perf_counter()
    return {"sent": sent, "chunks": chunk_times, "done": done, "tokens": tokens}


async def run_client(
    url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int
) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        # Idle time to first token: a 128-token prompt alone, after one warm-up request.
        idle = []
        for i in range(6):
            r = await _one(client, url, model, prompts[i % len(prompts)][:128], 2)
            if i and r["chunks"]:
                idle.append(1000 * (r["chunks"][0] - r["sent"]))
        gate = asyncio.Semaphore(concurrency)

        async def limited(prompt: list[int]) -> dict[str, Any]:
            async with gate:
                return await _one(client, url, model, prompt, output_len)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        wall = time.perf_counter() - start
    ttft = [1000 * (r["chunks"][0] - r["sent"]) for r in results if r["chunks"]]
    itl = [1000 * (b - a) for r in results for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    e2e = [1000 * (r["done"] - r["sent"]) for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e),
        "idle_ttft_ms": statistics.median(idle) if idle else float("nan"),
    }


# -- the server process ------------------------------------------------------------------------------
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
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--engine-process",
        action="store_true",
        help="serve from a ProcessEngine (engine loop in a child process, as kiln serve does); the offline "
        "engine stays loaded beside it, so both get --gpu-memory-utilization (default 0.42 then)",
    )
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--admission-interval", type=int, default=1, help="admit new requests every N steps")
    p.add_argument("--out", type=Path)
    p.add_argument("--client", help=argparse.SUPPRESS)  # URL: run as the load-generating child process
    p.add_argument("--served-model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    prompts_seed = 1

    if args.client:
        prompts = _prompts(args.num_requests, args.input_len, args.vocab, prompts_seed)
        result = asyncio.run(
            run_client(args.client, args.served_model, prompts, args.output_len, args.concurrency)
        )
        print(json.dumps(result))
        return 0

    from kiln.bench import build_random_engine, run_throughput
    from kiln.engine.async_engine import AsyncEngine
    from kiln.engine.llm_engine import LLMEngine
    from kiln.engine.options import EngineOptions
    from kiln.engine.process_engine import ProcessEngine
    from kiln.serve.background import serve_in_background
    from kiln.serve.settings import ServerSettings

    if (args.random is None) == (args.model is None):
        p.error("give exactly one of --random SHAPE or --model DIR")
    utilization = args.gpu_memory_utilization or (0.42 if args.engine_process else 0.9)
    options = EngineOptions(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=utilization,
        admission_interval=args.admission_interval,
    )
    if args.random:
        factory = functools.partial(build_random_engine, args.random, options)
    else:
        factory = functools.partial(LLMEngine.from_path, args.model, options)
    engine = factory()
    vocab = engine.model_config.vocab_size
    n, inp, out = args.num_requests, args.input_len, args.output_len
    offline = run_throughput(engine, n, [inp] * n, [out] * n, seed=prompts_seed)
    offline_tok_s = offline.output_tokens / offline.elapsed_s
    print(f"offline: {offline_tok_s:,.0f} output tok/s", flush=True)

    settings = ServerSettings(port=0, log_level="warning", max_waiting_requests=None, max_waiting_tokens=None)
    server_engine = ProcessEngine(factory) if args.engine_process else AsyncEngine(engine)
    with serve_in_background(server_engine, settings) as (url, _server):
        name = engine.model_info.name
        cmd = [
            sys.executable,
            "-m",
            "bench.served",
            "--client",
            url,
            "--served-model",
            name,
            "--vocab",
            str(vocab),
        ]
        cmd += ["--num-requests", str(n), "--input-len", str(inp), "--output-len", str(out)]
        cmd += ["--concurrency", str(args.concurrency)]
        served = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    served["offline_output_tok_s"] = offline_tok_s
    served["served_over_offline"] = served["output_tok_s"] / offline_tok_s
    print(json.dumps(served, indent=1))
    if args.out:
        _append(args.out, args, served)
    return 0


def _append(path: Path, args: argparse.Namespace, served: dict[str, Any]) -> None:
    import torch

    shape = f"{args.random or args.model} {args.num_requests}x{args.input_len}/{args.output_len}"
    params = {
        "concurrency": args.concurrency,
        "max_num_seqs": args.max_num_seqs,
        "engine_process": args.engine_process,
        "admission_interval": args.admission_interval,
    }
    rows = [
        ("served_output_tok_s", served["output_tok_s"]),
        ("offline_output_tok_s", served["offline_output_tok_s"]),
        ("served_over_offline", served["served_over_offline"]),
        ("idle_ttft_ms", served["idle_ttft_ms"]),
    ]
    rows += [
        (f"{m}_{q}", served[m][q]) for m in ("ttft_ms", "itl_ms", "e2e_ms") for q in ("p50", "p90", "p99")
    ]
    data: dict[str, Any] = {"device": {}, "results": []}
    if path.exists():
        data = json.loads(path.read_text())
    if torch.cuda.is_available():
        data["device"].setdefault("gpu", torch.cuda.get_device_name(0))
    note = "python -m bench.served " + " ".join(sys.argv[1:])
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
