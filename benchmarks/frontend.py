"""The serving front end's ceiling: the served workload against an engine whose model costs a fixed time.

    python -m benchmarks.frontend --step-ms 10 --num-requests 512 --out results.json
    python -m benchmarks.frontend --step-ms 10 --thread       # engine on a thread of the server's process

The engine is the real `LLMEngine` (scheduler, KV cache, detokenizer, stop checks, outputs) on the tiny
random model, with the model runner's launch replaced by a sleep of `--step-ms` and random tokens: a
GPU step that takes that long and leaves the host free. The same workload runs offline (`LLMEngine.step`
in a loop) and then through `kiln serve`'s HTTP/SSE API with the load from a separate client process,
as benchmarks/served.py does; the ratio says what the front end and the engine's relay cost, on any machine,
without a GPU. Beside it, the engine's own view of each run (`served.step_totals`): steps per second, mean
sequences per step, the share of the time spent in steps. A served run that keeps fewer sequences running
than offline lost throughput to requests arriving late (the client's turnaround and the server's work per
new request), one whose steps take longer lost it to the host; where the served requests' time went
(`request_phases_ms`, as benchmarks/served.py reports it). And the CPU time of the server's event-loop
thread per request (HTTP, SSE, the relay to the engine; `time.thread_time` read on that thread): the cost
that decides how fast a wave of new requests reaches the engine. Runs on CPU; results are this machine's,
not the GPU host's (which has more cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.served import phase_means, scrape_metrics, step_totals
from kiln.bench.client import IDLE_TTFT_REQUESTS
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.model_runner import LaunchedStep
from kiln.engine.process_setup import prepare_process
from kiln.engine.sampler import SamplerOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.serve.background import loop_cpu_seconds

VOCAB_LOW, VOCAB_HIGH = 10, 500  # token ids the tiny model's tokenizer decodes to ordinary text


def model_free_engine(path: str, step_s: float, max_num_seqs: int = 256) -> LLMEngine:
    """An LLMEngine on the tiny model at `path` whose steps take `step_s` seconds and run no model."""
    engine = LLMEngine.from_path(
        path,
        EngineConfig(
            device="cpu", max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, num_kv_blocks=8192
        ),
    )
    runner = engine.runner

    def launch(output, forwarded=None):  # CPU: steps run one at a time, never in two halves
        for request_id in output.finished_ids:
            runner._generators.pop(request_id, None)
        sample_ids = [item.request.request_id for item in output.scheduled if item.sample]
        if not output.is_empty:
            time.sleep(step_s)
        if not sample_ids:
            return LaunchedStep(sample_ids=[], output=None, done=None)
        tokens = torch.randint(VOCAB_LOW, VOCAB_HIGH, (len(sample_ids),))
        return LaunchedStep(sample_ids=sample_ids, output=SamplerOutput(token_ids=tokens), done=None)

    runner.launch = launch
    return engine


def prompts(n: int, length: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)] for _ in range(n)]


def offline(engine: LLMEngine, batch: list[list[int]], output_len: int) -> tuple[int, float]:
    """(output tokens, seconds) with every request queued at once."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"o{i}", params=params, prompt_token_ids=prompt)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(len(c.token_ids) for out in engine.step() for c in out.outputs)
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from kiln.build.tiny import write_tiny_checkpoint
    from kiln.clients.process import ProcessEngine
    from kiln.clients.thread import AsyncEngine
    from kiln.serve.background import serve_in_background
    from kiln.serve.settings import ServerSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--thread", action="store_true", help="engine on a thread (default: its own process)")
    p.add_argument("--out", type=Path, help="append the result to this JSON file")
    args = p.parse_args(argv)

    path = str(write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="kiln-frontend-")), seed=0))
    factory = functools.partial(model_free_engine, path, args.step_ms / 1000, args.concurrency)
    batch = prompts(args.num_requests, args.input_len)
    engine = factory()
    prepare_process(engine.config)
    before = engine.stats()
    tokens, seconds = offline(engine, batch, args.output_len)
    offline_steps = step_totals(before, engine.stats(), seconds)
    offline_tok_s = tokens / seconds
    del engine
    if args.thread:
        engine = factory()
        prepare_process(engine.config)
        server_engine = AsyncEngine(engine)
    else:
        server_engine = ProcessEngine(factory)
    settings = ServerSettings(
        port=0, log_level="warning", max_waiting_sequences=None, max_waiting_tokens=None
    )
    with serve_in_background(server_engine, settings) as (url, server):
        before, cpu_before, phases_before = (
            server_engine.stats(),
            loop_cpu_seconds(server),
            scrape_metrics(url),
        )
        client = [sys.executable, "-m", "benchmarks.served", "--client", url]
        client += ["--served-model", server_engine.model_info.name, "--vocab", str(VOCAB_HIGH)]
        client += ["--num-requests", str(args.num_requests), "--input-len", str(args.input_len)]
        client += ["--output-len", str(args.output_len), "--concurrency", str(args.concurrency)]
        root = Path(__file__).resolve().parents[1]
        served = json.loads(
            subprocess.run(client, check=True, stdout=subprocess.PIPE, text=True, cwd=root).stdout
        )
        served_steps = step_totals(before, server_engine.stats(), served["wall_s"])
        server_cpu = loop_cpu_seconds(server) - cpu_before
        phases = phase_means(phases_before, scrape_metrics(url))
    result = {
        "step_ms": args.step_ms,
        "engine": "thread" if args.thread else "process",
        "offline_output_tok_s": offline_tok_s,
        "served_output_tok_s": served["output_tok_s"],
        "served_over_offline": served["output_tok_s"] / offline_tok_s,
        "itl_ms": served["itl_ms"],
        "ttft_ms": served["ttft_ms"],
        "offline_engine_steps": offline_steps,
        "served_engine_steps": served_steps,
        "request_phases_ms": phases,
        # The client's idle-TTFT requests before the load (benchmarks.served) count among the requests.
        "server_cpu_ms_per_request": 1000 * server_cpu / (args.num_requests + IDLE_TTFT_REQUESTS),
        "server_loop_busy": server_cpu / served["wall_s"],
        "client_busy": served["client_busy"],
        "command": "python -m benchmarks.frontend " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps([*rows, result], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
