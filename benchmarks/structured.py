"""Structured outputs on the GPU: what a JSON schema costs a batch, and batch-1, against the same workload free.

    python -m benchmarks.structured TOKENIZER_DIR [--shape llama3.1-8b] [--num-requests 256] [--json OUT.json]
        [--profile OUT.txt] [--fill-threads N [N ...]]

Rules:
- One random-weight engine at a preset shape (kiln.bench.RANDOM_SHAPES) with a real byte-level tokenizer
  (TOKENIZER_DIR: an engine directory or a Hugging Face tokenizer); ids past the tokenizer's vocabulary are
  never allowed under a schema. Every request is greedy; free requests ignore EOS, constrained ones stop
  where their schema completes (or at max_tokens), so the figures are output tokens per second.
- Throughput: all requests added at once. The ratio compares like with like: the constrained run against
  the same prompts unconstrained, each request held to the length its constrained twin produced (a schema
  ends outputs early, which alone would shift the share of prefill). The free run at the full output
  length is reported beside it. After a warm-up of the whole batch both ways (16 tokens), runs alternate
  (`--repeats` each, best kept), so drift on the machine falls on all; the best constrained run is set
  against its own twin (`throughput_ratio`), and every repeat's pair is reported
  (`throughput_ratio_by_repeat`). Batch-1: ms/token after the first token, best of 3.
- Each run reports the host's milliseconds per step in each engine phase (`kiln.bench.profile.PhaseClock`);
  `collect` is the wait for the GPU, so a run whose `collect` is near zero is paced by the host.
- `--profile`: one more constrained run under cProfile, its 40 costliest functions written out: where the
  host's time goes (time spent waiting for the GPU shows as the event's synchronize).
- Compile: a fresh matcher for each schema in SCHEMAS (cold grammar cache), after the tokenizer is set up
  once (reported apart). Every constrained output that finished by its schema must parse and validate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.grammar_backends import SCHEMA as PERSON_SCHEMA

SCHEMAS: dict[str, dict[str, Any]] = {
    # Completes in a few tokens whatever the weights: what the CPU test of this script runs.
    "verdict": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    "person": PERSON_SCHEMA,
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 16},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "quantity", "price"],
                    "additionalProperties": False,
                },
            },
            "note": {"type": ["string", "null"], "maxLength": 200},
        },
        "required": ["id", "status", "items"],
        "additionalProperties": False,
    },
    "weather_tool_call": {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
}


def _params(max_tokens: int, schema: dict[str, Any] | None) -> Any:
    from kiln.engine.sampling_params import SamplingParams, StructuredOutput  # deferred: torch

    if schema is None:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, structured=StructuredOutput.json_schema(schema)
    )


def run_batch(
    engine: Any, prompts: list[list[int]], max_tokens: int | list[int], schema: dict[str, Any] | None
) -> dict[str, Any]:
    """Add every prompt at once (`max_tokens` for all, or one per prompt), step to the end; output tok/s,
    each output's length, the host's time per engine phase and what the constrained outputs were."""
    from kiln.bench.profile import PhaseClock  # deferred: torch
    from kiln.bench.workload import sync

    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    sync(engine)
    start = time.perf_counter()
    for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
        engine.add_request(f"b{i}", prompt_token_ids=prompt, params=_params(limit, schema))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    with PhaseClock(engine) as clock:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                for c in delta.outputs:
                    tokens.setdefault(delta.request_id, []).extend(c.token_ids)
                    reasons[delta.request_id] = c.finish_reason
    sync(engine)
    elapsed = time.perf_counter() - start
    generated = sum(len(t) for t in tokens.values())
    row: dict[str, Any] = {
        "output_tokens": generated,
        "elapsed_s": elapsed,
        "output_tok_per_s": generated / elapsed,
        "mean_output_len": generated / len(prompts),
        "output_lens": [len(tokens.get(f"b{i}", [])) for i in range(len(prompts))],
        "steps": clock.calls["step"],
        "phase_ms_per_step": clock.per_step_ms(),
    }
    if schema is not None:
        row.update(_check_outputs(engine, tokens, reasons, schema))
    return row


def _check_outputs(
    engine: Any, tokens: dict[str, list[int]], reasons: dict[str, str | None], schema: dict[str, Any]
) -> dict[str, int]:
    """Every output its schema completed must parse and validate; the others stopped at max_tokens."""
    import jsonschema  # deferred: only the check needs it

    completed = [rid for rid, why in reasons.items() if why == "stop"]
    for rid in completed:
        text = engine.tokenizer.hf.decode(tokens[rid], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), schema)  # raises: the benchmark fails loudly
    return {"completed_by_schema": len(completed), "stopped_at_max_tokens": len(reasons) - len(completed)}


def run_batch1(
    engine: Any, prompt: list[int], max_tokens: int, schema: dict[str, Any] | None
) -> dict[str, float]:
    """One request alone: ms per token after the first, best of 3 after a warm-up."""
    from kiln.bench.offline import step_until_done  # deferred: torch, the engine

    best: dict[str, float] | None = None
    for rep in range(4):
        start = time.perf_counter()
        engine.add_request(f"one{rep}", prompt_token_ids=prompt, params=_params(max_tokens, schema))
        first, count, end = step_until_done(engine)
        if rep == 0 or first is None or count < 2:
            continue
        row = {
            "ttft_ms": 1e3 * (first - start),
            "ms_per_token": 1e3 * (end - first) / (count - 1),
            "tokens": count,
        }
        if best is None or row["ms_per_token"] < best["ms_per_token"]:
            best = row
    assert best is not None, "no timed batch-1 run produced two tokens"
    return best


def profile_run(engine: Any, prompts: list[list[int]], max_tokens: int, schema: dict[str, Any]) -> str:
    """One constrained run under cProfile: its costliest functions by own time, as text."""
    import cProfile  # deferred: only --profile needs them
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    row = run_batch(engine, prompts, max_tokens, schema)
    profiler.disable()
    text = io.StringIO()
    text.write(f"{row['output_tokens']} tokens in {row['elapsed_s']:.3f} s\n")
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    return text.getvalue()


def set_fill_threads(engine: Any, threads: int) -> None:
    """Give `engine` (and its runner, which shares them) fresh matchers whose masks fill on `threads`
    threads: grammars compile again, llguidance's tokenizer set-up is kept. Nothing when it has them."""
    from kiln.engine.structured import Grammars  # deferred: torch

    if engine.grammars.threads == threads:
        return
    grammars = Grammars(engine.tokenizer.hf, threads=threads, tokenizer=engine.grammars.tokenizer)
    engine.grammars = engine.runner.grammars = grammars


def compile_times(engine: Any) -> dict[str, Any]:
    """A new schema's cost: its grammar, a matcher and the first mask (cold cache, tokenizer set up)."""
    import torch  # deferred: as the engine

    from kiln.engine.sampling_params import StructuredOutput  # deferred: torch

    start = time.perf_counter()
    engine.grammars.tokenizer  # noqa: B018  (set up once per engine; reported apart)
    setup_ms = 1e3 * (time.perf_counter() - start)
    rows = {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        matcher = engine.grammars.matcher(StructuredOutput.json_schema(schema))
        # llguidance builds its lexer lazily: the first mask is part of what a new schema costs.
        mask = torch.empty((1, engine.grammars.mask_words()), dtype=torch.int32)
        engine.grammars.fill_masks([matcher], mask)
        rows[name] = 1e3 * (time.perf_counter() - start)
    return {"tokenizer_setup_ms": setup_ms, "compile_ms": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.splitlines()[0])
    p.add_argument("tokenizer_dir", type=Path)
    p.add_argument("--shape", default="llama3.1-8b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--schema", choices=sorted(SCHEMAS), default="order")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--profile", type=Path, help="write a host profile of one constrained run here")
    p.add_argument(
        "--fill-threads",
        type=int,
        nargs="+",
        help="run the constrained throughput with each of these mask-filling thread counts (default: the"
        " engine's); the first is the one the ratio and the profile use",
    )
    args = p.parse_args(argv)

    from kiln.bench.workload import build_random_engine, random_prompts  # deferred: torch, the engine
    from kiln.config import EngineConfig, EngineLimits

    limits = EngineLimits(max_batch_size=max(args.num_requests, 1), max_num_tokens=8192)
    engine = build_random_engine(args.shape, EngineConfig(), limits, tokenizer_dir=args.tokenizer_dir)
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer.hf))
    schema = SCHEMAS[args.schema]
    result: dict[str, Any] = {
        "shape": args.shape,
        "tokenizer_vocab": len(engine.tokenizer.hf),
        "schema": args.schema,
        "workload": f"{args.num_requests} x {args.input_len}/{args.output_len}",
        "compile": compile_times(engine),
    }
    print(json.dumps(result["compile"]))
    prompts = random_prompts(args.num_requests, [args.input_len] * args.num_requests, vocab, 0)
    # Warm-up at the full batch, both paths: the step shapes of 256 prompts' prefill and decode compile and
    # capture here, not in whichever timed run meets them first.
    run_batch(engine, prompts, 16, None)
    run_batch(engine, prompts, 16, schema)
    threads = args.fill_threads or [engine.grammars.threads]
    runs: dict[str, list[dict[str, Any]]] = {"schema": [], "free_same_lengths": [], "free": []}
    runs |= {f"schema_threads_{t}": [] for t in threads[1:]}
    for _ in range(args.repeats):
        for i, t in enumerate(threads):
            set_fill_threads(engine, t)
            runs["schema" if i == 0 else f"schema_threads_{t}"].append(
                run_batch(engine, prompts, args.output_len, schema)
            )
        set_fill_threads(engine, threads[0])
        lengths = [max(n, 1) for n in runs["schema"][-1]["output_lens"]]
        runs["free_same_lengths"].append(run_batch(engine, prompts, lengths, None))
        runs["free"].append(run_batch(engine, prompts, args.output_len, None))
        for label, rows in runs.items():
            print(label, json.dumps({k: v for k, v in rows[-1].items() if k != "output_lens"}))
    best = {label: max(rows, key=lambda r: r["output_tok_per_s"]) for label, rows in runs.items()}
    # The control of a constrained run is its own twin (same repeat, same lengths), not the best free run.
    twin = runs["schema"].index(best["schema"])
    best["free_same_lengths"] = runs["free_same_lengths"][twin]
    result["throughput_ratio_by_repeat"] = [
        held["output_tok_per_s"] / free["output_tok_per_s"]
        for held, free in zip(runs["schema"], runs["free_same_lengths"], strict=True)
    ]
    for row in best.values():
        del row["output_lens"]
    result["throughput"] = best
    result["fill_threads"] = threads
    result["throughput_ratio"] = (
        best["schema"]["output_tok_per_s"] / best["free_same_lengths"]["output_tok_per_s"]
    )
    result["throughput_ratio_vs_full_length"] = (
        best["schema"]["output_tok_per_s"] / best["free"]["output_tok_per_s"]
    )
    if args.profile:
        args.profile.write_text(profile_run(engine, prompts, args.output_len, schema))
    one = {
        label: run_batch1(engine, prompts[0], args.output_len, s)
        for label, s in (("free", None), ("schema", schema))
    }
    result["batch1"] = one
    result["batch1_slowdown"] = one["schema"]["ms_per_token"] / one["free"]["ms_per_token"] - 1
    result["throughput_runs_tok_per_s"] = {
        label: [round(r["output_tok_per_s"]) for r in rows] for label, rows in runs.items()
    }
    summary = (
        f"throughput: schema {best['schema']['output_tok_per_s']:.0f} / free at the same lengths"
        f" {best['free_same_lengths']['output_tok_per_s']:.0f} tok/s = {100 * result['throughput_ratio']:.1f}%"
        f" (free at {args.output_len} tokens: {best['free']['output_tok_per_s']:.0f}); batch-1: schema {one['schema']['ms_per_token']:.3f}"
        f" / free {one['free']['ms_per_token']:.3f} ms/token = {100 * result['batch1_slowdown']:+.1f}%;"
        f" compile median {statistics.median(result['compile']['compile_ms'].values()):.1f} ms"
    )
    print(summary)
    for t in threads[1:]:
        row = best[f"schema_threads_{t}"]
        ratio = row["output_tok_per_s"] / best["free_same_lengths"]["output_tok_per_s"]
        print(f"schema with {t} filling threads: {row['output_tok_per_s']:.0f} tok/s = {100 * ratio:.1f}%")
    for label in ("schema", "free_same_lengths"):
        print(
            f"{label}: {best[label]['steps']} steps; host ms per step by phase:",
            best[label]["phase_ms_per_step"],
        )
    result["summary"] = summary
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
