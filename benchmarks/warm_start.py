"""Warm restart of `kiln serve` on the CPU: from the process start to /health, /ready and the first token.

    python -m benchmarks.warm_start --runs 5 --out results.json --md warm_start.md
    python -m benchmarks.warm_start --runs 5 --before .before   # A/B: another tree's kiln, run by run

`--before DIR` (e.g. `mkdir .before && git archive <commit> | tar -x -C .before`) alternates each run
between that tree's `kiln` (PYTHONPATH=DIR, started outside this checkout) and this checkout's, so
both meet the same load on the machine.

Each run starts a fresh `kiln serve` process (the default model unless `--model`; it is built into
Kiln's cache first if missing, outside the timing) on a free port and measures, from just before the
process is spawned: /health answering 200 (the port is open), /ready answering 200 (the engine runs),
and the first streamed token of a chat completion sent at that moment. Then it stops the server with
SIGTERM. Reported: every run, and the median of each figure. "Warm" means what a restart finds: the
engine directory already built, its files in the page cache (the first run warms them; it is counted
like the others, and `--warmup 1` leaves it out). Each server's own `model loaded in X s` log line
(LoadingEngine) is reported beside.

Rules: nothing here is timed inside the server; the clock is this process's `time.perf_counter()`,
polling every `POLL_S`, so a figure may be late by up to one poll.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

POLL_S = 0.01
TIMEOUT_S = 120.0
TARGET_READY_S = 3.0  # a warm restart of the default model ready within this on the 2-core CPU machine
METRICS = ("health_s", "ready_s", "first_token_s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _wait_for(url: str, process: subprocess.Popen[bytes], deadline: float) -> float:
    """Poll `url` until it answers 200; the perf_counter time it did."""
    while time.perf_counter() < deadline:
        if _status(url) == 200:
            return time.perf_counter()
        if process.poll() is not None:
            raise RuntimeError(f"kiln serve exited with code {process.returncode} before {url} answered 200")
        time.sleep(POLL_S)
    raise TimeoutError(f"{url} did not answer 200 within {TIMEOUT_S} s")


def _first_token(base: str) -> float:
    """Send one streamed chat completion; the perf_counter time its first content token arrived."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[len("data: ") :]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                return time.perf_counter()
    raise RuntimeError("the stream ended without a token")


def serve_command(model: str | None, port: int) -> list[str]:
    """The `kiln serve` command line, run with this interpreter (as the `kiln` script does)."""
    code = "import sys; from kiln.cli import main; sys.argv[0] = 'kiln'; main()"
    return [sys.executable, "-c", code, "serve", *([model] if model else []), "--port", str(port)]


def measure(model: str | None = None, tree: Path | None = None) -> dict[str, Any]:
    """One warm restart: seconds from spawning `kiln serve` to /health, /ready and the first token;
    `tree`: run that directory's kiln instead of the installed one."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree.resolve())
    with tempfile.TemporaryFile() as log, tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        process = subprocess.Popen(  # cwd elsewhere: `-c` puts the cwd first on sys.path
            serve_command(model, port), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        try:
            deadline = start + TIMEOUT_S
            health = _wait_for(f"{base}/health", process, deadline)
            ready = _wait_for(f"{base}/ready", process, deadline)
            token = _first_token(base)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    return {
        "health_s": health - start,
        "ready_s": ready - start,
        "first_token_s": token - start,
        "phases": _phases(output),
    }


def _phases(log: str) -> dict[str, float]:
    """What the server's log says of its start: `model loaded` (seconds the loader took: the engine
    process's start, weights, tokenizer, KV cache), empty when absent."""
    found = re.search(r"model loaded in ([0-9.]+) s", log)
    return {"model loaded": float(found.group(1))} if found else {}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {metric: statistics.median(run[metric] for run in runs) for metric in METRICS}


def markdown(runs: list[dict[str, Any]], command: str) -> str:
    median = summarize(runs)
    lines = [
        f"`{command}`",
        "",
        "| run | /health 200, s | /ready 200, s | first token, s | server log, s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, run in enumerate(runs, 1):
        phases = ", ".join(f"{k} {v:.2f}" for k, v in run["phases"].items()) or "-"
        lines.append(
            f"| {i} | {run['health_s']:.2f} | {run['ready_s']:.2f} | {run['first_token_s']:.2f} | {phases} |"
        )
    lines.append(
        f"| median | {median['health_s']:.2f} | {median['ready_s']:.2f} | {median['first_token_s']:.2f} | |"
    )
    met = "met" if median["ready_s"] <= TARGET_READY_S else "not met"
    lines += ["", f"Target: ready in <= {TARGET_READY_S:.0f} s (median): {met}."]
    return "\n".join(lines) + "\n"


def _append_json(path: Path, runs: list[dict[str, Any]], label: str, command: str) -> None:
    import platform

    data = json.loads(path.read_text()) if path.exists() else {"device": {}, "results": []}
    data["device"] = data["device"] or {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    rows = [(f"run {i}", run) for i, run in enumerate(runs, 1)] + [("median", summarize(runs))]
    for shape, values in rows:
        for metric in METRICS:
            data["results"].append(
                {
                    "suite": "startup",
                    "name": "kiln/warm_start_cpu",
                    "shape": f"{label} {shape}",
                    "metric": metric,
                    "value": values[metric],
                    "params": {},
                    "note": command,
                }
            )
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="what to serve (default: the embedded default model)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=0, help="runs before the measured ones, not reported")
    p.add_argument("--out", type=Path, help="append the rows to this results JSON")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    p.add_argument("--before", type=Path, help="a tree whose kiln runs first in every run, for an A/B")
    args = p.parse_args(argv)
    command = "python -m benchmarks.warm_start " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.model is None:  # a first start builds the default model: never inside the timing
        from kiln.build.default_model import ensure_default_engine

        ensure_default_engine()
    trees: dict[str, Path | None] = {"this checkout": None}
    if args.before is not None:
        trees = {"before": args.before, "after": None}
    for _ in range(args.warmup):
        for tree in trees.values():
            measure(args.model, tree)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    for _ in range(args.runs):
        for label, tree in trees.items():
            run = measure(args.model, tree)
            print(json.dumps({"tree": label, **run}), flush=True)
            runs[label].append(run)
    tables = "\n".join(f"{label}:\n\n{markdown(done, command)}" for label, done in runs.items())
    print(tables, end="")
    if args.md:
        args.md.write_text(tables)
    if args.out:
        for label, done in runs.items():
            _append_json(args.out, done, f"{args.model or 'default model'} {label}", command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
