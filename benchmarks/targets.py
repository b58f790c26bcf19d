"""Issue 16's figures in priority order within a time budget: what one device call of limited length can
measure, spread over as many calls as it takes.

    python -m benchmarks.targets --budget 540 --out results.json --done targets.done
    python -m benchmarks.targets --list

Rules:
- Steps run in the order of STEPS, the figures furthest from being judged on an H200 first; each is a
  subprocess that appends its rows to `--out` (benchmarks.timing's format, what `benchmarks.report`
  judges), its output in `--log-dir`/NAME.log.
- A step starts only if its estimate fits what is left of the budget, and is stopped at the budget's end
  (then it counts as failed); a step that does not fit is skipped and the later, shorter ones still run.
- `--done FILE` lists each step that exited 0, and steps listed there are not run again: the set spreads
  over several calls, each with its own budget.
- Estimates are wall seconds (random weights built on the device, compiles, warm-up, the run): what each
  step took on the H200 on 2026-12-06 at 0015b55, with a margin and the workload-shaped warm-up added
  since; the peers' (transformers) include their own model builds. The int8 steps' and offline FP8's
  (the first FP8 run on an empty Triton cache compiles its kernels) come from an H100's run at d7ef3c1;
  the served host profile's is the served step's with py-spy's start added; the GEMV sweeps' are an
  H100's (2026-12-05).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = (sys.executable, "-m", "kiln.bench")
OFFLINE_8B = (*BENCH, "--random", "llama3.1-8b", "--throughput-only", "--max-num-seqs", "512")
BATCH1_7B = (*BENCH, "--random", "llama2-7b", "--latency-only")
FP8_CACHE = ("--quantization", "fp8", "--kv-cache-dtype", "fp8")
LONG = ("--num-requests", "1024", "--input-len", "1000", "--output-len", "1000")
SERVED = (sys.executable, "-m", "benchmarks.served", "--random", "llama3.1-8b", "--num-requests", "1024",
          "--input-len", "128", "--output-len", "128", "--concurrency", "256", "--max-num-seqs", "256",
          "--engine-process")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    estimate_s: int
    argv: tuple[str, ...]  # "{out}" stands for the results file, "{dir}" in an argument for its folder

    def command(self, out: Path) -> list[str]:
        return [str(out) if arg == "{out}" else arg.replace("{dir}", str(out.parent)) for arg in self.argv]


STEPS = (
    # What the H200 has not judged yet: SmoothQuant (each scheme must run there; it and the 8-bit schemes
    # offline have no target of their own), and the two figures whose output an earlier call lost.
    Step("batch1-int8-sq", 45, (*BATCH1_7B, "--quantization", "int8-sq", "--json", "{out}")),
    Step("offline-fp8", 75, (*OFFLINE_8B, "--quantization", "fp8", "--json", "{out}")),
    Step("startup", 150, (sys.executable, "-m", "benchmarks.startup", "--random", "llama2-7b", "--dir",
                          "/tmp/kiln-llama2-7b", "--repeats", "1", "--out", "{out}")),
    Step("offline-int8-sq", 35, (*OFFLINE_8B, "--quantization", "int8-sq", "--json", "{out}")),
    Step("offline-int8-wo", 35, (*OFFLINE_8B, "--quantization", "int8-wo", "--json", "{out}")),
    # The served miss's host side: the server's threads, the engine process and the client under py-spy
    # (benchmarks.host_profile), the figure again beside it.
    Step("profile-served-host", 100, (sys.executable, "-m", "benchmarks.host_profile", "--report",
                                      "{dir}/profile-served-host.txt", "--", *SERVED, "--out", "{out}")),
    Step("offline-fp8-fp8kv", 90, (*OFFLINE_8B, *FP8_CACHE, "--json", "{out}")),
    Step("batch1-fp16", 40, (*BATCH1_7B, "--json", "{out}")),
    Step("batch1-fp8", 30, (*BATCH1_7B, "--quantization", "fp8", "--json", "{out}")),
    Step("offline-bf16", 75, (*OFFLINE_8B, "--json", "{out}")),
    Step("batch1-int8-wo", 30, (*BATCH1_7B, "--quantization", "int8-wo", "--json", "{out}")),
    Step("hf-static", 75, (sys.executable, "-m", "benchmarks.hf_baselines", "--modes", "static_compile",
                            "--out", "{out}")),
    Step("fp8-1000-fp8kv", 125, (*OFFLINE_8B, *LONG, *FP8_CACHE, "--json", "{out}")),
    Step("served", 80, (*SERVED, "--out", "{out}")),
    Step("prefill", 40, (sys.executable, "-m", "benchmarks.prefill", "--random", "llama3.1-8b", "--json", "{out}")),
    Step("hf-batch", 90, (sys.executable, "-m", "benchmarks.hf_baselines", "--modes", "batch", "--out", "{out}")),
    # Where the time goes, for the targets most likely missed: the figure again, then 30 steps under
    # torch.profiler (deep into the decode where --profile-after says), the report beside the results.
    Step("profile-batch1-fp8", 30, (*BATCH1_7B, "--quantization", "fp8", "--profile",
                                     "{dir}/profile-batch1-fp8.txt", "--json", "{out}")),
    Step("profile-offline-fp8-fp8kv", 40, (*OFFLINE_8B, *FP8_CACHE, "--profile",
                                            "{dir}/profile-offline-fp8-fp8kv.txt", "--profile-after", "60",
                                            "--json", "{out}")),
    Step("profile-fp8-1000-fp8kv", 110, (*OFFLINE_8B, "--num-requests", "512", "--input-len", "1000",
                                         "--output-len", "1000", *FP8_CACHE, "--profile",
                                         "{dir}/profile-fp8-1000-fp8kv.txt", "--profile-after", "560",
                                         "--json", "{out}")),
    Step("profile-batch1-fp16", 30, (*BATCH1_7B, "--profile", "{dir}/profile-batch1-fp16.txt", "--json", "{out}")),
    Step("profile-offline-bf16", 40, (*OFFLINE_8B, "--profile", "{dir}/profile-offline-bf16.txt",
                                       "--profile-after", "60", "--json", "{out}")),
    Step("profile-batch1-int8-wo", 30, (*BATCH1_7B, "--quantization", "int8-wo", "--profile",
                                         "{dir}/profile-batch1-int8-wo.txt", "--json", "{out}")),
    # The batch-1 GEMVs' tiles were chosen on an H100: the sweeps on this GPU, cuBLAS beside them.
    Step("sweep-gemv", 60, (sys.executable, "-m", "benchmarks.gemv", "--out", "{out}")),
    Step("sweep-quant-gemv", 60, (sys.executable, "-m", "benchmarks.quant_gemv", "--sweep", "--skip-gemm",
                                   "--out", "{out}")),
)  # fmt: skip


@dataclass(slots=True)
class Outcome:
    ran: list[str] = field(default_factory=list)  # exited 0
    failed: list[tuple[str, int]] = field(
        default_factory=list
    )  # (name, exit status; -1: stopped at the budget)
    skipped: list[str] = field(default_factory=list)  # did not fit what was left


def launch(command: list[str], log: Path, timeout_s: float) -> int:
    """Run one step; its exit status, or -1 when it ran past `timeout_s` (then it is killed).

    The step runs in a session of its own, and whatever is left of it when it ends or runs out of time
    is killed with it: a served run's engine process or load client, or a profiled command under
    py-spy, must not hold the GPU or the host through the next step."""
    with log.open("w") as out:
        step = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return step.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return -1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(step.pid, signal.SIGKILL)
            step.wait()


def run(
    steps: Sequence[Step],
    budget_s: float,
    out: Path,
    log_dir: Path,
    done: Path | None = None,
    *,
    run_step: Callable[[list[str], Path, float], int] = launch,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Run `steps` in order within `budget_s` seconds (see the module rules)."""
    finished = set(done.read_text().split()) if done is not None and done.exists() else set()
    log_dir.mkdir(parents=True, exist_ok=True)
    began, outcome = clock(), Outcome()
    for step in steps:
        if step.name in finished:
            continue
        left = budget_s - (clock() - began)
        if left < step.estimate_s:
            outcome.skipped.append(step.name)
            continue
        print(f"=== {step.name} ({left:.0f} s left): {' '.join(step.command(out))}", flush=True)
        status = run_step(step.command(out), log_dir / f"{step.name}.log", left)
        if status == 0:
            outcome.ran.append(step.name)
            if done is not None:
                with done.open("a") as f:
                    f.write(step.name + "\n")
        else:
            outcome.failed.append((step.name, status))
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=540.0, help="seconds this call may spend (default 540)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/results.json"))
    p.add_argument("--log-dir", type=Path, help="where each step's output goes (default: --out's folder)")
    p.add_argument("--done", type=Path, help="steps finished in earlier calls, extended by this one")
    p.add_argument("--only", nargs="+", metavar="STEP", help="these steps, in STEPS' order")
    p.add_argument("--list", action="store_true", help="print the steps and their estimates, run nothing")
    args = p.parse_args(argv)
    names = [step.name for step in STEPS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(names)}")
    if args.budget <= 0:
        p.error("--budget must be > 0 seconds")
    steps = [step for step in STEPS if not args.only or step.name in args.only]
    if args.list:
        for step in steps:
            print(f"{step.name:20s} ~{step.estimate_s:4d} s  {' '.join(step.command(args.out))}")
        return 0
    outcome = run(steps, args.budget, args.out, args.log_dir or args.out.parent, args.done)
    print(f"ran: {', '.join(outcome.ran) or '-'}")
    print(f"failed: {', '.join(f'{n} ({s})' for n, s in outcome.failed) or '-'}")
    print(f"did not fit: {', '.join(outcome.skipped) or '-'}")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
