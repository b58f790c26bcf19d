"""benchmarks.report: the targets table judges each target from the rows the files hold, every run shown."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report

RECORD = Path(__file__).resolve().parents[2] / "docs" / "results" / "2026-12-06-h100"


def _targets(markdown: str) -> dict[str, list[str]]:
    """The targets table's rows by label: [Kiln's runs, peers, goal, met]."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("4", "16"):
            rows[cells[1]] = cells[2:]
    return rows


def test_offline_fp8_with_the_fp8_cache_is_judged_apart_from_the_16_bit_cache() -> None:
    # Two real runs with the fp8 cache (call 34) and one with a 16-bit cache (call 30), read in that order.
    paths = [RECORD / f"offline-fp8-fp8kv-06d81f7-{i}.json" for i in (1, 2)]
    paths.append(RECORD / "offline-fp8-fast-accum-9f6b1c0.json")
    rows, devices = report.load(paths)
    table = _targets(report.markdown(rows, devices))
    assert table["offline, Llama-3.1-8B FP8 with the fp8 KV cache, 1024 x 128/128, output tok/s"] == [
        "26,234, 26,169",
        "–",
        ">= 28,500",
        "no",
    ]
    assert table["offline, Llama-3.1-8B FP8, 1024 x 128/128, output tok/s"] == [
        "24,191",
        "–",
        ">= 28,500",
        "no",
    ]
    # A target no file measures says so, rather than borrowing another row.
    assert table["offline, Llama-3.1-8B bf16, 1024 x 128/128, output tok/s"][0] == "not measured"
    assert all(device["gpu"] == "NVIDIA H100 80GB HBM3" for device in devices)


def test_a_target_met_in_some_runs_only_says_so(tmp_path: Path) -> None:
    row = {"suite": "kiln", "name": "kiln/offline_throughput", "metric": "output_tok_per_s", "params": {}}
    shape = "llama3.1-8b fp8 kv-fp8 1024 req 128 in / 128 out, <= 512 running"
    for i, value in enumerate((29_000.0, 27_000.0)):
        (tmp_path / f"{i}.json").write_text(
            json.dumps({"results": [{**row, "shape": shape, "value": value}]})
        )
    rows, devices = report.load(sorted(tmp_path.glob("*.json")))
    table = _targets(report.markdown(rows, devices))
    label = "offline, Llama-3.1-8B FP8 with the fp8 KV cache, 1024 x 128/128, output tok/s"
    assert table[label] == ["29,000, 27,000", "–", ">= 28,500", "not in every run"]
