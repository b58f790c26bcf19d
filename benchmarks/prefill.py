"""Prefill: time to first token of one long prompt per length, beside the machine's matmul ceiling.

    python -m benchmarks.prefill --random llama3.1-8b --json prefill.json --markdown prefill.md
    python -m benchmarks.prefill --model ENGINE_DIR --lengths 1024 8192

Rules of the measurement:
- One engine: random weights at a preset shape (made on the device) or a model directory, in its dtype,
  with `max_model_len` one past the longest prompt and a token budget per step (`--max-num-batched-tokens`)
  of the longest prompt by default, so each prompt is one step; a smaller budget measures chunked prefill.
- TTFT of a length: one request of that many random token ids and `max_tokens` 1, from `add_request` to
  its token on the host; one untimed request of the same length first (compiles, captures), then the
  best of `--repeats`, nothing else running (`kiln.bench.offline.run_latency`, best by TTFT).
- Prefix caching is off: every prompt is computed whole. (Prompts drawn with the same seed at two
  lengths share their first tokens, so with it on a longer prompt reused the shorter one's blocks.)
- The work of a prefill of L tokens, in FLOPs: 2 x L x (the layers' projection parameters: q, k, v, o,
  gate, up, down), plus causal attention 2 x layers x L^2 x (heads x head_dim) (QK^T and PV, each
  2 x L^2 x d over the lower triangle, half of the square), plus the LM head for the one sampled row.
- The ceiling: the median time of one [S, S] @ [S, S] matmul in the engine's dtype (S = `--ceiling-size`,
  8192 by default; `benchmarks.timing.bench_us` on CUDA), timed in the same process before the prompts
  and again after them, the faster of the two counting; share = achieved / ceiling. (One timing alone
  read 682 and 772 TFLOP/s in two processes on one H100, minutes apart, with the same prefill speed.)
- Reported per length: TTFT (ms), achieved TFLOP/s, share of the ceiling; `--json` writes the rows
  (benchmarks.timing's format), `--markdown` the table; both printed. `--profile DIR`: after the timed
  runs, one more prompt of each length under torch.profiler, its op tables in DIR/prefill-LENGTH.txt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import Result, bench_us, write_results
from kiln.bench.offline import run_latency
from kiln.bench.profile import profile_first_token
from kiln.bench.workload import add_engine_arguments, build_random_engine, engine_config
from kiln.config import DTYPES, ModelConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.process_setup import prepare_process

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]


@dataclass(slots=True)
class PrefillRow:
    length: int
    ttft_ms: float
    tflops: float  # achieved
    share: float  # of the ceiling


def prefill_flops(config: ModelConfig, length: int) -> float:
    """The FLOPs of one prefill of `length` tokens (the module's rule)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.q_size, config.kv_size
    projections = h * q + 2 * h * kv + q * h + 3 * h * i
    attention = 2 * layers * length * length * q
    return 2.0 * length * layers * projections + attention + 2.0 * h * config.vocab_size


def matmul_tflops(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 20) -> float:
    """TFLOP/s of one [size, size] @ [size, size] matmul: benchmarks.timing's median on CUDA, else the
    median of `repeats` host-timed runs after a warm-up."""
    a = torch.randn((size, size), dtype=dtype, device=device)
    b = torch.randn((size, size), dtype=dtype, device=device)
    if device.type == "cuda":
        seconds = bench_us(lambda: torch.matmul(a, b)) / 1e6
    else:
        torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    return 2.0 * size**3 / seconds / 1e12


def measure(
    engine: LLMEngine, lengths: list[int], repeats: int, ceiling_size: int
) -> tuple[float, list[PrefillRow]]:
    dtype = DTYPES[engine.dtype]
    before = matmul_tflops(ceiling_size, dtype, engine.device)
    timed = []
    for length in lengths:
        ms = run_latency(engine, length, 1, repeats=repeats, best_by="ttft_ms").ttft_ms
        achieved = prefill_flops(engine.model_config, length) / (ms / 1e3) / 1e12
        timed.append((length, ms, achieved))
        print(f"prefill {length:6d} tokens: TTFT {ms:9.2f} ms, {achieved:7.1f} TFLOP/s", flush=True)
    after = matmul_tflops(ceiling_size, dtype, engine.device)
    print(f"matmul ceiling: {before:.1f} TFLOP/s before the prompts, {after:.1f} after", flush=True)
    ceiling = max(before, after)
    return ceiling, [PrefillRow(length, ms, achieved, achieved / ceiling) for length, ms, achieved in timed]


def markdown(name: str, device: str, ceiling: float, ceiling_size: int, rows: list[PrefillRow]) -> str:
    lines = [
        f"Prefill of one prompt, {name} on {device}; ceiling: {ceiling:,.1f} TFLOP/s "
        f"([{ceiling_size}]² matmul in the engine's dtype, same process).",
        "",
        "| prompt tokens | TTFT, ms | TFLOP/s | share of the ceiling |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r.length:,} | {r.ttft_ms:,.1f} | {r.tflops:,.1f} | {r.share:.1%} |" for r in rows]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", choices=["llama2-7b", "llama3.1-8b"], help="random weights at this shape")
    p.add_argument("--model", help="an engine or Hugging Face checkpoint directory")
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths, tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed prompts per length (best counts)")
    p.add_argument("--ceiling-size", type=int, default=8192, help="side of the square matmul ceiling")
    p.add_argument("--json", type=Path, help="append the rows to this results file")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument(
        "--profile",
        type=Path,
        help="also profile one more prompt of each length (kiln.bench.profile.profile_first_token): the"
        " host and GPU op tables in DIR/prefill-LENGTH.txt",
    )
    add_engine_arguments(p, skip=("max_model_len", "enable_prefix_caching"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if (args.random is None) == (args.model is None):
        p.error("give exactly one of --random SHAPE or --model DIR")
    if min(args.lengths) < 1 or args.repeats < 1 or args.ceiling_size < 1:
        p.error("--lengths, --repeats and --ceiling-size must be positive")
    longest = max(args.lengths)
    budget = args.max_num_batched_tokens or longest
    try:
        config = engine_config(
            args, max_model_len=longest + 1, max_num_batched_tokens=budget, enable_prefix_caching=False
        )
        if args.random:
            engine = build_random_engine(args.random, config)
        else:
            engine = LLMEngine.from_path(args.model, config)
    except ValueError as exc:  # a knob out of range
        p.error(str(exc))
    if engine.config.max_model_len <= longest:  # the model's context, or the KV cache, is shorter
        p.error(
            f"this engine takes prompts of at most {engine.config.max_model_len - 1} tokens, not {longest}"
        )
    prepare_process(engine.config)
    name = args.random or Path(args.model).name
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    ceiling, rows = measure(engine, sorted(args.lengths), args.repeats, args.ceiling_size)
    if args.profile:
        for length in sorted(args.lengths):
            summary = profile_first_token(engine, length, args.profile / f"prefill-{length}.txt")
            print(f"profile of a {length}-token prompt: {summary}")
    table = markdown(name, device, ceiling, args.ceiling_size, rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        params: dict[str, Any] = {
            "max_num_batched_tokens": budget,
            "dtype": engine.dtype,
            "prefix_cache_hits": engine.stats().prefix_cache_hits,
        }
        command = "python -m benchmarks.prefill " + " ".join(sys.argv[1:] if argv is None else argv)
        results = [
            Result("prefill", "kiln/matmul_ceiling", f"{args.ceiling_size}^3", "tflops", ceiling, params)
        ]
        for r in rows:
            shape = f"{name} {r.length} tokens"
            results.append(Result("prefill", "kiln/prefill_ttft", shape, "ms", r.ttft_ms, params, command))
            results.append(
                Result("prefill", "kiln/prefill_tflops", shape, "tflops", r.tflops, params, command)
            )
            results.append(Result("prefill", "kiln/prefill_share", shape, "ratio", r.share, params, command))
        write_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
