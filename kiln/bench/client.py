"""Load generator for an OpenAI-compatible server: streamed completions at a concurrency cap and a rate.

Used by `kiln bench --url` (any running server) and benchmarks/served.py (Kiln's own, beside offline).

Rules of the measurements:
- Each request streams `/v1/completions` with a token-id prompt, greedy, `ignore_eos` and
  `include_usage`, so it makes exactly `output_len` tokens; the count comes from the usage chunk.
- Arrivals: all at once (`request_rate` inf), or a Poisson process of that many requests per second
  (exponential gaps, fixed seed), or the times given (`arrivals`, e.g. benchmarks/slo.py's bursts). At
  most `concurrency` requests are in flight; an arrival beyond that waits at the client, and its clock
  starts when it is sent. `output_lens` gives each request its own output length.
- TTFT = request sent -> first chunk with text; inter-token latency = gaps between text chunks (a chunk
  may carry several tokens when the server batches them); end-to-end = sent -> `[DONE]`; p50/p90/p99 in
  ms. Throughput = completion tokens / wall time of the whole load.
- Idle TTFT: before the load, IDLE_TTFT_REQUESTS (6) two-token requests one at a time; the median of the
  last 5.
- The load generator must not be what limits the load, so it is lean: aiohttp (C-accelerated HTTP
  parsing, as vLLM's serving benchmark uses) on uvloop where installed, and each response is read to its
  end so its keep-alive connection is reused (`connections` counts those opened). With httpx the client
  process took ~105 us of CPU per streamed token, with aiohttp ~55 (`bench.frontend`, 2-core machine).
  Whether it limited a run is in the result: `client_busy` is the process's CPU time over the load's wall
  time (one event loop: near 1.0 means the client, not the server, set the pace).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
IDLE_TTFT_REQUESTS = 6  # two-token requests one at a time before the load (the module rules)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


def arrival_times(n: int, request_rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of n requests arrives (all at 0 for an infinite rate)."""
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


async def _one(client: Any, url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
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
    done = None
    async with client.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        # Read to the end of the body (not just to [DONE]): a response left unread closes its connection.
        async for line in response.content:  # one SSE line at a time, as bytes
            if not line.startswith(b"data: "):
                continue
            data = line[6:].rstrip(b"\r\n")
            if data == b"[DONE]":
                done = time.perf_counter()
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                chunk_times.append(time.perf_counter())
    if done is None:
        done = time.perf_counter()
    return {"sent": sent, "chunks": chunk_times, "done": done, "tokens": tokens}


async def run_client(
    url: str,
    model: str,
    prompts: list[list[int]],
    output_len: int,
    concurrency: int,
    request_rate: float = math.inf,
    seed: int = 0,
    *,
    arrivals: list[float] | None = None,
    output_lens: list[int] | None = None,
) -> dict[str, Any]:
    """Run the load (see the module rules); returns throughput, latency percentiles and idle TTFT."""
    import aiohttp

    connections = 0

    async def opened(*_: Any) -> None:
        nonlocal connections
        connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(opened)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace]) as client:
        idle = []
        for i in range(IDLE_TTFT_REQUESTS):
            r = await _one(client, url, model, prompts[i % len(prompts)][:128], 2)
            if i and r["chunks"]:
                idle.append(1000 * (r["chunks"][0] - r["sent"]))
        gate = asyncio.Semaphore(concurrency)

        async def arrive(prompt: list[int], at: float, max_tokens: int) -> dict[str, Any]:
            await asyncio.sleep(at)
            async with gate:
                return await _one(client, url, model, prompt, max_tokens)

        start, cpu_start = time.perf_counter(), time.process_time()
        times = arrivals if arrivals is not None else arrival_times(len(prompts), request_rate, seed)
        lens = output_lens if output_lens is not None else [output_len] * len(prompts)
        results = await asyncio.gather(
            *(arrive(p, t, n) for p, t, n in zip(prompts, times, lens, strict=True))
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ttft = [1000 * (r["chunks"][0] - r["sent"]) for r in results if r["chunks"]]
    itl = [1000 * (b - a) for r in results for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    e2e = [1000 * (r["done"] - r["sent"]) for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "request_rate": None if math.isinf(request_rate) else request_rate,  # None: all at once
        "concurrency": concurrency,
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e),
        "idle_ttft_ms": statistics.median(idle) if idle else float("nan"),
        "connections": connections,
        "client_cpu_s": cpu,
        "client_busy": cpu / wall,
    }


def run_load(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the client's coroutine to completion on uvloop where it is installed (Kiln depends on it
    except on Windows), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
