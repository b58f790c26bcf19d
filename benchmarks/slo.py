"""SLO-driven batching on the GPU: one bursty workload served twice, fixed configuration vs the controller.

    python -m benchmarks.slo --random llama3.1-8b --json slo.json --markdown slo.md
    python -m benchmarks.slo --model ENGINE_DIR ...                 # a real engine instead of random weights

The claim it checks (kiln.serve.slo): under a bursty Poisson load the fixed configuration misses the
inter-token p99 target and the controller meets it, at >= 90% of the fixed configuration's output
throughput.

Rules of the measurement:
- One engine (native, random weights at a preset shape or a model dir; by default in its own process,
  as `kiln serve` runs it) serves both runs, each through the OpenAI server in this process, with the
  load from a separate client process (`kiln.bench.client`: streamed completions, greedy, `ignore_eos`,
  so each makes exactly its output length; TTFT, inter-token gaps between text chunks, throughput =
  completion tokens / wall time). Prefix caching is off by default, so the second run's prompts (the
  same as the first's) are computed again rather than hit.
- The workload, the same in both runs (one seed): a Poisson process whose rate alternates between
  `--calm-rate` for `--calm-s` seconds and `--burst-rate` for `--burst-s` seconds, over `--duration-s`
  seconds of arrivals; prompt and output lengths uniform in their ranges. Long prompts arriving in a
  burst fill whole token budgets with prefill chunks, and every running stream's next token waits for
  those steps: that is what the fixed configuration's ITL p99 sees.
- Before the runs, a warm-up at the workload's shapes (untimed). Before each run the engine's
  batching limits are set back to the fixed configuration (the engine's flags); "fixed" serves with
  no SLO flags, "controller" with `--slo-itl-ms`, `--slo-ttft-ms` and the controller's flags.
- Reported per run: output tok/s, TTFT and ITL p50/p99, whether each p99 meets its target, and for the
  controller its adjustments and the limits it ran with (sampled every 0.25 s); then controller/fixed
  throughput and the verdict (fixed misses ITL p99, controller meets it, ratio >= 0.9). `--json`
  writes all of it, `--markdown` the table; both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kiln.bench.client import run_client, run_load
from kiln.bench.workload import add_engine_arguments, engine_config, random_prompts

RATIO_NEEDED = 0.9


def bursty_arrivals(
    duration_s: float, calm_rate: float, burst_rate: float, calm_s: float, burst_s: float, seed: int
) -> list[float]:
    """Arrival times (seconds from the start, rising, below `duration_s`) of a Poisson process whose rate
    is `calm_rate` for `calm_s` seconds, then `burst_rate` for `burst_s`, and so on. Exponential gaps are
    memoryless, so each phase draws its own from its start."""
    rng = random.Random(seed)
    times: list[float] = []
    start, burst = 0.0, False
    while start < duration_s:
        length, rate = (burst_s, burst_rate) if burst else (calm_s, calm_rate)
        end = min(start + length, duration_s)
        now = start + rng.expovariate(rate) if rate > 0 else end
        while now < end:
            times.append(now)
            now += rng.expovariate(rate)
        start, burst = end, not burst
    return times


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[float], list[list[int]], list[int]]:
    """Arrival times, prompts and output lengths: the same for every run with the same flags."""
    times = bursty_arrivals(
        args.duration_s, args.calm_rate, args.burst_rate, args.calm_s, args.burst_s, args.workload_seed
    )
    rng = random.Random(args.workload_seed + 1)
    lengths = [rng.randint(*args.input_len_range) for _ in times]
    outputs = [rng.randint(*args.output_len_range) for _ in times]
    return times, random_prompts(len(times), lengths, vocab, args.workload_seed + 2), outputs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", choices=["llama2-7b", "llama3.1-8b"], help="random weights at this shape")
    p.add_argument("--model", help="an engine or Hugging Face checkpoint directory")
    p.add_argument("--duration-s", type=float, default=100.0, help="seconds of arrivals")
    p.add_argument("--calm-rate", type=float, default=1.0, help="arrivals per second between bursts")
    # A burst must queue more prompt tokens than one step's budget takes: otherwise every step holds at
    # most one prompt and the fixed configuration meets the ITL target by itself.
    p.add_argument("--burst-rate", type=float, default=30.0, help="arrivals per second in a burst")
    p.add_argument("--calm-s", type=float, default=20.0)
    p.add_argument("--burst-s", type=float, default=5.0)
    p.add_argument("--input-len-range", type=int, nargs=2, default=(1024, 2048), metavar=("MIN", "MAX"))
    p.add_argument("--output-len-range", type=int, nargs=2, default=(128, 384), metavar=("MIN", "MAX"))
    p.add_argument("--concurrency", type=int, default=1024, help="most requests in flight at the client")
    p.add_argument("--workload-seed", type=int, default=0, help="arrivals, lengths and prompts")
    p.add_argument("--slo-itl-ms", type=float, default=100.0, help="the ITL target (and the one judged)")
    p.add_argument("--slo-ttft-ms", type=float, default=10_000.0, help="the TTFT target")
    p.add_argument("--slo-quantile", type=float, default=0.99)
    p.add_argument("--slo-interval-seconds", type=float, default=0.5)
    p.add_argument("--slo-window-seconds", type=float, default=10.0)
    p.add_argument("--slo-min-admission-interval", type=int, default=1)
    p.add_argument("--slo-max-admission-interval", type=int, default=4)
    p.add_argument("--slo-min-token-budget", type=int, default=512)
    p.add_argument("--slo-min-num-seqs", type=int, default=16)
    p.add_argument("--warmup-requests", type=int, default=16)
    add_engine_arguments(p)
    p.set_defaults(enable_prefix_caching=False)  # see the rules: run 2 must not hit run 1's prompts
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--client", help=argparse.SUPPRESS)  # URL: run as the load-generating child process
    p.add_argument("--served-model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    return p


def _client_main(args: argparse.Namespace) -> int:
    times, prompts, outputs = workload(args, args.vocab)
    if args.warmup:  # the workload's shapes, all at once
        n = min(args.warmup_requests, len(prompts))
        times, prompts, outputs = [0.0] * n, prompts[:n], [min(16, o) for o in outputs[:n]]
    result = run_load(
        run_client(
            args.client, args.served_model, prompts, 0, args.concurrency, arrivals=times, output_lens=outputs
        )
    )
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.client:
        return _client_main(args)
    if (args.random is None) == (args.model is None):
        p.error("give exactly one of --random SHAPE or --model DIR")
    try:
        config = engine_config(args)
    except ValueError as exc:
        p.error(str(exc))

    from kiln.bench.workload import build_random_engine
    from kiln.clients.process import ProcessEngine, engine_from_path
    from kiln.clients.thread import AsyncEngine
    from kiln.engine.info import BatchingLimits
    from kiln.engine.process_setup import prepare_process
    from kiln.serve.background import serve_in_background
    from kiln.serve.settings import SLO_CONTROLLER_SETTINGS, ServerSettings

    if args.random:
        factory = functools.partial(build_random_engine, args.random, config)
    else:
        factory = functools.partial(engine_from_path, args.model, config)
    if args.engine_process:
        engine: Any = ProcessEngine(factory)
    else:
        llm = factory()
        prepare_process(llm.config)
        engine = AsyncEngine(llm)
    ceiling = engine.stats().batching_ceiling
    fixed = BatchingLimits(args.admission_interval, ceiling.max_num_batched_tokens, ceiling.max_num_seqs)
    name = engine.model_info.name
    vocab = engine.tokenizer.vocab_size
    client = [sys.executable, "-m", "benchmarks.slo", "--client", "URL", "--served-model", name]
    client += ["--vocab", str(vocab), *_workload_flags(args)]
    base = {"port": 0, "log_level": "warning", "max_waiting_sequences": None, "max_waiting_tokens": None}
    slo = {"slo_itl_ms": args.slo_itl_ms, "slo_ttft_ms": args.slo_ttft_ms}
    slo |= {flag: getattr(args, flag) for flag in SLO_CONTROLLER_SETTINGS}
    times, _, outputs = workload(args, vocab)
    print(
        f"{len(times)} requests over {args.duration_s:g} s, {sum(outputs)} output tokens; fixed limits "
        f"{fixed}; targets ITL p{args.slo_quantile * 100:g} {args.slo_itl_ms:g} ms, TTFT {args.slo_ttft_ms:g} ms",
        flush=True,
    )
    runs: dict[str, dict[str, Any]] = {}
    try:
        for run, settings in (("warmup", base), ("fixed", base), ("controller", base | slo)):
            asyncio.run(engine.set_batching(fixed))
            with serve_in_background(engine, ServerSettings(**settings), shutdown_engine=False) as (
                url,
                server,
            ):
                command = [url if part == "URL" else part for part in client]
                sampler = _LimitSampler(engine)
                sampler.start()
                try:
                    out = subprocess.run(
                        [*command, *(["--warmup"] if run == "warmup" else [])],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                finally:
                    sampler.stop()
                if run == "warmup":
                    continue
                result = json.loads(out)
                result["limits"] = sampler.summary()
                if server.state.slo is not None:
                    result["adjustments"] = _adjustments(server.state.metrics.registry)
                runs[run] = result
            print(f"{run}: {_line(runs[run], args)}", flush=True)
    finally:
        asyncio.run(engine.shutdown())
    report = _report(args, fixed, runs)
    table = markdown(report)
    print(json.dumps(_without_timelines(report), indent=1))  # the timelines go to --json only
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


def _without_timelines(report: dict[str, Any]) -> dict[str, Any]:
    runs = {
        run: {**result, "limits": {k: v for k, v in result["limits"].items() if k != "timeline"}}
        for run, result in report["runs"].items()
    }
    return {**report, "runs": runs}


def _workload_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--duration-s", str(args.duration_s), "--calm-rate", str(args.calm_rate)]
    flags += [
        "--burst-rate",
        str(args.burst_rate),
        "--calm-s",
        str(args.calm_s),
        "--burst-s",
        str(args.burst_s),
    ]
    flags += ["--input-len-range", *map(str, args.input_len_range)]
    flags += ["--output-len-range", *map(str, args.output_len_range)]
    flags += ["--concurrency", str(args.concurrency), "--workload-seed", str(args.workload_seed)]
    return [*flags, "--warmup-requests", str(args.warmup_requests)]


class _LimitSampler:
    """The engine's batching limits every 0.25 s while a run lasts (from its last report)."""

    def __init__(self, engine: Any, every_s: float = 0.25) -> None:
        self.engine = engine
        self.every_s = every_s
        self.samples: list[tuple[float, int | None, int | None, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        began = time.monotonic()
        while not self._stop.wait(self.every_s):
            limits = self.engine.stats().batching
            self.samples.append(
                (
                    round(time.monotonic() - began, 2),
                    limits.admission_interval,
                    limits.max_num_batched_tokens,
                    limits.max_num_seqs,
                )
            )

    def summary(self) -> dict[str, Any]:
        budgets = [s[2] for s in self.samples if s[2] is not None]
        return {
            "token_budget_min": min(budgets, default=None),
            "token_budget_mean": sum(budgets) / len(budgets) if budgets else None,
            "admission_interval_max": max((s[1] for s in self.samples if s[1] is not None), default=None),
            "max_num_seqs_min": min((s[3] for s in self.samples if s[3] is not None), default=None),
            "timeline": self.samples,  # (seconds, admission interval, token budget, seqs)
        }


def _adjustments(registry: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for metric in registry.collect():
        if metric.name != "kiln_slo_adjustments":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels['direction']}/{sample.labels['lever']}"
                counts[key] = int(sample.value)
    return counts


def _meets(result: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    return {
        "itl": result["itl_ms"]["p99"] <= args.slo_itl_ms,
        "ttft": result["ttft_ms"]["p99"] <= args.slo_ttft_ms,
    }


def _line(result: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"{result['output_tok_s']:,.0f} output tok/s, TTFT p99 {result['ttft_ms']['p99']:,.0f} ms, "
        f"ITL p99 {result['itl_ms']['p99']:,.1f} ms (target {args.slo_itl_ms:g})"
    )


def _report(args: argparse.Namespace, fixed: Any, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for result in runs.values():
        result["meets"] = _meets(result, args)
    ratio = runs["controller"]["output_tok_s"] / runs["fixed"]["output_tok_s"]
    verdict = (
        not runs["fixed"]["meets"]["itl"] and runs["controller"]["meets"]["itl"] and ratio >= RATIO_NEEDED
    )
    return {
        "command": "python -m benchmarks.slo " + " ".join(sys.argv[1:]),
        "shape": args.random or args.model,
        "workload": {
            "duration_s": args.duration_s,
            "calm_rate": args.calm_rate,
            "burst_rate": args.burst_rate,
            "calm_s": args.calm_s,
            "burst_s": args.burst_s,
            "input_len_range": list(args.input_len_range),
            "output_len_range": list(args.output_len_range),
            "workload_seed": args.workload_seed,
        },
        "targets": {"quantile": args.slo_quantile, "itl_ms": args.slo_itl_ms, "ttft_ms": args.slo_ttft_ms},
        "fixed_limits": {
            "admission_interval": fixed.admission_interval,
            "max_num_batched_tokens": fixed.max_num_batched_tokens,
            "max_num_seqs": fixed.max_num_seqs,
        },
        "runs": runs,
        "throughput_ratio": ratio,
        "claim_holds": verdict,
        "device": _device(),
    }


def _device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def markdown(report: dict[str, Any]) -> str:
    """The runs side by side, the ratio and the verdict."""
    targets = report["targets"]
    q = f"p{targets['quantile'] * 100:g}"
    rows = [
        f"| run | output tok/s | TTFT p50 ms | TTFT {q} ms | ITL p50 ms | ITL {q} ms | ITL {q} <= "
        f"{targets['itl_ms']:g} ms | TTFT {q} <= {targets['ttft_ms']:g} ms | token budget (min / mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for run, result in report["runs"].items():
        limits = result["limits"]
        mean = limits["token_budget_mean"]
        budget = f"{limits['token_budget_min']} / {mean:,.0f}" if mean is not None else "-"
        rows.append(
            f"| {run} | {result['output_tok_s']:,.1f} | {result['ttft_ms']['p50']:,.0f} | "
            f"{result['ttft_ms']['p99']:,.0f} | {result['itl_ms']['p50']:,.1f} | {result['itl_ms']['p99']:,.1f} | "
            f"{'yes' if result['meets']['itl'] else 'no'} | {'yes' if result['meets']['ttft'] else 'no'} | {budget} |"
        )
    verdict = "holds" if report["claim_holds"] else "does not hold"
    rows += [
        "",
        f"Controller / fixed throughput: {report['throughput_ratio']:.3f} (needed >= {RATIO_NEEDED}). "
        f"The claim (fixed misses ITL {q}, controller meets it, ratio >= {RATIO_NEEDED}) {verdict}. "
        f"Device: {report['device']}; {report['shape']}.",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
