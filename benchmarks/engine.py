"""Kiln's native engine on the issue's workloads, each in its own process (a fresh GPU per shape):

- llama2-7b fp16: batch-1 decode, 128 in / 128 out (ms per token, TTFT);
- llama3.1-8b bf16: offline throughput, 1024 requests of 128 in / 128 out, then batch-1 latency;
  the throughput again with up to 512 requests running (256 is the default).

Each run also profiles 30 engine steps (profile_<shape>_b<batch>.txt beside the JSON: GPU-busy vs wall time
per step, host time per engine phase, top kernels).
Run: `python -m benchmarks.engine --out benchmarks/results/results.json` (each run appends its rows).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

WORKLOAD = ["--num-requests", "1024", "--input-len", "128", "--output-len", "128"]
# (kiln bench arguments, profile file name or None)
RUNS: list[tuple[list[str], str | None]] = [
    (
        ["--random", "llama2-7b", "--latency-only", "--input-len", "128", "--output-len", "128"],
        "llama2-7b_b1",
    ),
    (["--random", "llama3.1-8b", *WORKLOAD], "llama3.1-8b_b256"),
    # The same workload with twice the running requests: does a larger decode batch pay?
    (
        ["--random", "llama3.1-8b", *WORKLOAD, "--max-num-seqs", "512", "--throughput-only"],
        "llama3.1-8b_b512",
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/results.json"))
    parser.add_argument("--num-requests", type=int, help="override the throughput run's request count")
    args = parser.parse_args(argv)
    status = 0
    for run, profile in RUNS:
        run = list(run)
        if args.num_requests and "--num-requests" in run:
            run[run.index("--num-requests") + 1] = str(args.num_requests)
        command = [sys.executable, "-m", "kiln.bench", *run, "--json", str(args.out)]
        if profile:
            command += ["--profile", str(args.out.parent / f"profile_{profile}.txt")]
        print("$", " ".join(command), flush=True)
        status |= subprocess.call(command)
    return status


if __name__ == "__main__":
    sys.exit(main())
