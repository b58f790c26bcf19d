"""`kiln bench`: offline throughput and batch-1 latency of the native engine.

    kiln bench MODEL_OR_ENGINE_DIR [--num-requests 1024 --input-len 128 --output-len 128]
    kiln bench --random llama3.1-8b                # random weights at a preset shape, built on the GPU
    kiln bench --random llama2-7b --latency-only   # batch-1 ms per token and time to first token
    kiln bench --random llama2-7b --latency-only --enforce-eager   # the same without decode CUDA graphs
    kiln bench --random llama2-7b --latency-only --quantization fp8   # random weights quantized on the GPU
    kiln bench --url http://127.0.0.1:8000 --concurrency 64 --request-rate 20   # a running server

Rules of the measurements:
- Prompts are random token ids (fixed seed), so results do not depend on a tokenizer or a dataset;
  with --input-len-range / --output-len-range each request draws its lengths uniformly.
- Every request is greedy with `ignore_eos`, so it produces exactly its output length.
- Throughput: all requests are added at once and the engine is stepped until none is left; output
  tokens per second = generated tokens / wall time from the first step to the last (a warm-up at
  the workload's shapes runs first, so one-off compilation is not counted).
- Latency: one request alone; TTFT = time from add_request to the step that returns its first
  token; ms per token = (end - first token) / (output_len - 1).
- Served (`--url`): the load goes to a running OpenAI-compatible server (Kiln's or any other) from
  this process, with the rules of `kiln.bench.client`; prompts are random ids in [10, 500).
- `--json PATH` appends the figures, with the device and the exact command, to a results file
  (the format of benchmarks/README.md).
- `--quantization int8-wo|fp8|int8-sq` (with `--random` only: an engine directory carries its own)
  quantizes the random weights on the device as `kiln build --quantization` would, so the quantized
  kernels are timed beside the 16-bit ones; int8-sq's smoothing factors are all 1 (no calibration
  text for random weights). `--quant-group-size G` gives int8-wo one scale per G inputs.
- `--kv-cache-dtype fp8` (with `--random` only: an engine directory's cache dtype is its build's) gives the
  random engine an fp8 E4M3 KV cache, with or without `--quantization`. With no calibration text for
  random weights, every layer's k_scale and v_scale is 1.0 (vLLM's default without checkpoint scales;
  the time of a step does not depend on them); the JSON's params say so (`kv_cache_scales`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kiln.bench.offline import run_latency, run_throughput
from kiln.bench.profile import profile_first_token, profile_steps
from kiln.bench.workload import (
    RANDOM_ENGINE_LIMITS,
    RANDOM_KV_SCALES,
    RANDOM_SHAPES,
    add_engine_arguments,
    build_random_engine,
    engine_config,
    random_kv_cache_config,
    random_prompts,
    random_quant_config,
    request_lengths,
)
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.process_setup import prepare_process


def _span(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, _, high = text.partition(":")
    return int(low), int(high)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="engine or Hugging Face directory (or use --random)")
    parser.add_argument("--random", choices=sorted(RANDOM_SHAPES), help="random weights at a preset shape")
    parser.add_argument(
        "--quantization",
        help="with --random: quantize the random weights (int8-wo, fp8 or int8-sq; see docs/quantization.md)",
    )
    parser.add_argument(
        "--quant-group-size", type=int, help="with --random --quantization int8-wo: inputs per weight scale"
    )
    parser.add_argument(
        "--kv-cache-dtype",
        help="with --random: auto (the model's dtype) or fp8 (E4M3 KV cache, every scale 1.0: no calibration)",
    )
    parser.add_argument("--num-requests", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--input-len-range", help="LOW:HIGH, sample input lengths uniformly")
    parser.add_argument("--output-len-range", help="LOW:HIGH, sample output lengths uniformly")
    parser.add_argument("--latency-only", action="store_true", help="skip the throughput run")
    parser.add_argument("--throughput-only", action="store_true", help="skip the latency run")
    # The engine's knobs, generated from EngineConfig (the engine always runs in this process here).
    add_engine_arguments(parser, skip={"engine_process"})
    parser.add_argument("--url", help="measure a running OpenAI-compatible server at this base URL instead")
    parser.add_argument("--served-model", help="with --url: the model name to send (default: its first)")
    parser.add_argument("--concurrency", type=int, default=64, help="with --url: requests in flight at most")
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="with --url: Poisson arrivals per second"
    )
    parser.add_argument("--json", type=Path, help="append the results to this JSON file")
    parser.add_argument(
        "--profile",
        type=Path,
        help="also profile 30 steps (at batch 1 with --latency-only); text report here",
    )
    parser.add_argument(
        "--profile-after",
        type=int,
        help="with --profile: steps run before the profiled ones (default 3; more to profile the decode "
        "of long sequences)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kiln bench` (also `python -m kiln.bench`); returns the exit status."""
    args = _parser().parse_args(argv)
    if (args.model is not None) + (args.random is not None) + (args.url is not None) != 1:
        print(
            "kiln bench: give a MODEL directory, --random SHAPE or --url URL (one of them)", file=sys.stderr
        )
        return 2
    random_only = (args.quantization, args.quant_group_size, args.kv_cache_dtype)
    if not args.random and any(flag is not None for flag in random_only):
        print(
            "kiln bench: --quantization, --quant-group-size and --kv-cache-dtype apply to --random engines "
            "only (an engine directory is quantized, its KV cache included, when it is built)",
            file=sys.stderr,
        )
        return 2
    if args.profile_after is not None and (args.profile is None or args.profile_after < 0):
        print("kiln bench: --profile-after takes a count of steps >= 0, and needs --profile", file=sys.stderr)
        return 2
    if args.url:
        return _bench_server(args, argv)
    try:
        config = engine_config(args)
        quant = random_quant_config(args.quantization, args.quant_group_size)
        kv_cache = random_kv_cache_config(args.kv_cache_dtype)
    except ValueError as exc:
        print(f"kiln bench: {exc}", file=sys.stderr)
        return 2
    if args.random:
        limits = dataclasses.replace(RANDOM_ENGINE_LIMITS, max_seq_len=4096)
        engine = build_random_engine(args.random, config, limits, quant=quant, kv_cache=kv_cache)
        label = args.random if quant is None else f"{args.random} {quant.scheme}"
        if quant is not None and quant.group_size is not None:
            label += f" g{quant.group_size}"
        if kv_cache is not None:
            label += " kv-fp8"
        kv_scales = None if kv_cache is None else RANDOM_KV_SCALES
    else:
        engine = LLMEngine.from_path(args.model, config)
        label = Path(args.model).name
        kv_scales = "calibrated at build (engine.json)" if engine.config.kv_cache_dtype == "fp8" else None
    prepare_process(engine.config)
    rows: list[dict[str, Any]] = []
    max_num_seqs = engine.config.max_num_seqs
    params = {
        "dtype": engine.dtype,
        "max_num_seqs": max_num_seqs,
        "block_size": engine.config.block_size,
        "enforce_eager": args.enforce_eager,
        "admission_interval": args.admission_interval,
        "piecewise_graphs": args.piecewise_graphs,
        "prefill_graph_tokens": engine.config.prefill_graph_tokens,
        "quantization": None if quant is None else quant.scheme,
        "quant_group_size": None if quant is None else quant.group_size,
        "kv_cache_dtype": engine.config.kv_cache_dtype,
        "kv_cache_scales": kv_scales,
    }
    if not args.latency_only:
        inputs = request_lengths(args.num_requests, args.input_len, _span(args.input_len_range), args.seed)
        outputs = request_lengths(
            args.num_requests, args.output_len, _span(args.output_len_range), args.seed + 1
        )
        tp = run_throughput(engine, args.num_requests, inputs, outputs, args.seed)
        workload = (
            f"{args.num_requests} req {args.input_len_range or args.input_len} in / "
            f"{args.output_len_range or args.output_len} out, <= {max_num_seqs} running"
        )
        print(
            f"{label}: {workload}: {tp.output_tok_per_s:,.0f} output tok/s ({tp.total_tok_per_s:,.0f} total) in {tp.elapsed_s:.1f} s"
        )
        if tp.kernel_compiles:
            print(f"{label}: the timed pass built {tp.kernel_compiles} Triton kernel variants: a cold figure")
        rows.append(
            _row(
                label,
                "offline_throughput",
                "output_tok_per_s",
                tp.output_tok_per_s,
                workload,
                params | asdict(tp),
            )
        )
    if not args.throughput_only:
        lat = run_latency(engine, args.input_len, args.output_len, args.seed)
        workload = f"batch 1, {lat.input_len} in / {lat.output_len} out"
        print(f"{label}: {workload}: {lat.ms_per_token:.2f} ms/token, TTFT {lat.ttft_ms:.1f} ms")
        rows.append(_row(label, "batch1_decode", "ms_per_token", lat.ms_per_token, workload, params))
        rows.append(_row(label, "ttft", "ms", lat.ttft_ms, workload, params))
    if args.profile:
        batch = 1 if args.latency_only else min(args.num_requests, max_num_seqs)
        summary = profile_steps(
            engine,
            batch,
            args.input_len,
            args.output_len,
            30,
            args.profile,
            args.seed,
            3 if args.profile_after is None else args.profile_after,
        )
        print(
            f"{label}: profile of 30 steps at batch {batch}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in summary.items())
        )
        rows.append(_row(label, "profile_step", "ms", summary["step_ms"], f"batch {batch}", params | summary))
        if not args.throughput_only:
            ttft_path = args.profile.with_name(args.profile.stem + "_ttft.txt")
            ttft = profile_first_token(engine, args.input_len, ttft_path, args.seed)
            print(f"{label}: profile of one {args.input_len}-token prompt to its first token: {ttft}")
    if args.json:
        _append_json(args.json, rows, argv)
    return 0


def _bench_server(args: argparse.Namespace, argv: list[str] | None) -> int:
    """`kiln bench --url`: the served workload against a running server."""
    # The load generator's HTTP stack (aiohttp, uvloop) loads only for --url.
    import aiohttp
    import httpx

    from kiln.bench.client import run_client, run_load

    url = args.url.rstrip("/").removesuffix("/v1")
    model = args.served_model
    try:
        if model is None:
            model = httpx.get(f"{url}/v1/models", timeout=30).raise_for_status().json()["data"][0]["id"]
        inputs = request_lengths(args.num_requests, args.input_len, _span(args.input_len_range), args.seed)
        prompts = random_prompts(len(inputs), inputs, 500, args.seed)  # ids every vocabulary has
        result = run_load(
            run_client(url, model, prompts, args.output_len, args.concurrency, args.request_rate, args.seed)
        )
    except (httpx.HTTPError, aiohttp.ClientError, KeyError, IndexError) as exc:
        print(f"kiln bench: the server at {url} did not answer as an OpenAI API: {exc}", file=sys.stderr)
        return 1
    rate = "all at once" if result["request_rate"] is None else f"{result['request_rate']:g} req/s"
    workload = f"{args.num_requests} req {args.input_len} in / {args.output_len} out, {rate}, <= {args.concurrency} in flight"
    print(f"{model} at {url}: {workload}: {result['output_tok_s']:,.0f} output tok/s")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        print(f"  {name[:-3]:4s} ms p50/p90/p99: " + " / ".join(f"{v:,.1f}" for v in result[name].values()))
    print(f"  idle TTFT {result['idle_ttft_ms']:.1f} ms")
    if args.json:
        params = {"url": url, "concurrency": args.concurrency, "request_rate": result["request_rate"]}
        rows = [_row(model, "served", "output_tok_per_s", result["output_tok_s"], workload, params)]
        rows += [
            _row(model, "served", f"{name}_{q}", value, workload, params)
            for name in ("ttft_ms", "itl_ms", "e2e_ms")
            for q, value in result[name].items()
        ]
        _append_json(args.json, rows, argv)
    return 0


def _row(
    shape: str, name: str, metric: str, value: float, workload: str, params: dict[str, Any]
) -> dict[str, Any]:
    return {
        "suite": "kiln",
        "name": f"kiln/{name}",
        "shape": f"{shape} {workload}",
        "metric": metric,
        "value": value,
        "params": params,
        "note": "",
    }


def _append_json(path: Path, rows: list[dict[str, Any]], argv: list[str] | None) -> None:
    data: dict[str, Any] = {"device": {}, "results": []}
    if path.exists():
        data = json.loads(path.read_text())
    if torch.cuda.is_available():
        data["device"].setdefault("gpu", torch.cuda.get_device_name(0))
    command = "kiln bench " + " ".join(sys.argv[1:] if argv is None else argv)
    for row in rows:
        row["note"] = command
    data["results"].extend(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
