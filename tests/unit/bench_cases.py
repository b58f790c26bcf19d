"""Helpers shared by the tests of `kiln bench`'s random engines on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.bench import cli, workload


def greedy_tokens(engine, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding of one request through `engine` to its end: the tokens it made."""
    engine.add_request("r", params=workload.greedy(max_tokens), prompt_token_ids=prompt)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
    return tokens


def bench_latency_rows(shape: str, tmp_path: Path, *flags: str) -> list[dict]:
    """`kiln bench --random SHAPE --latency-only` on the CPU (4 tokens in, 3 out) with `flags`: its JSON rows."""
    out = tmp_path / "results.json"
    argv = ["--random", shape, *flags, "--latency-only", "--device", "cpu"]
    argv += ["--input-len", "4", "--output-len", "3", "--json", str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())["results"]
