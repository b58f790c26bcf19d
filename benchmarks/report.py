"""Turn results JSON files (benchmarks/timing.py's format) into a markdown report and one PNG of plots.

    python -m benchmarks.report RESULTS.json [MORE.json ...] --md results.md --png DIR

Rules: only rows present in the files are shown (nothing is filled in); where several rows hold the
same (name, shape, metric), the tables show the last one read, and the targets table every one of
them in the order read (repeated runs stay visible); the markdown names the device and date of each
file. The plots need matplotlib; without it the markdown is still written.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

# The targets: (issue, label, kiln row, peer rows, goal text, goal test); a row is (name, shape prefix,
# metric), and the prefix names one row (a quantized run's shape starts with its scheme: "llama2-7b fp8 ...").
# Issue 16's are set for one H200: the report's header names each file's GPU.
_HF_BATCH1 = [
    ("hf/generate_eager", "llama2-7b", "ms_per_token"),
    ("hf/generate_static_compiled", "llama2-7b", "ms_per_token"),
]
_OFFLINE = "1024 req 128 in / 128 out"
TARGETS = [
    (16, "batch-1 decode, Llama-2-7B fp16, ms/token",
     ("kiln/batch1_decode", "llama2-7b batch 1", "ms_per_token"), _HF_BATCH1, "<= 3.5", lambda v: v <= 3.5),
    (16, "batch-1 decode, Llama-2-7B FP8, ms/token",
     ("kiln/batch1_decode", "llama2-7b fp8 batch 1", "ms_per_token"), [], "<= 1.9", lambda v: v <= 1.9),
    (16, "batch-1 decode, Llama-2-7B INT8 weight-only, ms/token",
     ("kiln/batch1_decode", "llama2-7b int8_wo batch 1", "ms_per_token"), [], "<= 2.0", lambda v: v <= 2.0),
    (16, "offline, Llama-3.1-8B bf16, 1024 x 128/128, output tok/s",
     ("kiln/offline_throughput", f"llama3.1-8b {_OFFLINE}", "output_tok_per_s"),
     [("hf/generate_batch", "llama3.1-8b", "output_tok_per_s")], ">= 20,000", lambda v: v >= 20000),
    (16, "offline, Llama-3.1-8B FP8, 1024 x 128/128, output tok/s",
     ("kiln/offline_throughput", f"llama3.1-8b fp8 {_OFFLINE}", "output_tok_per_s"), [], ">= 28,500",
     lambda v: v >= 28500),
    (16, "offline, Llama-3.1-8B FP8 with the fp8 KV cache, 1024 x 128/128, output tok/s",
     ("kiln/offline_throughput", f"llama3.1-8b fp8 kv-fp8 {_OFFLINE}", "output_tok_per_s"), [], ">= 28,500",
     lambda v: v >= 28500),
    (16, "offline, Llama-3.1-8B FP8, 1024 x 1000/1000, output tok/s",
     ("kiln/offline_throughput", "llama3.1-8b fp8 1024 req 1000 in / 1000 out", "output_tok_per_s"), [],
     ">= 18,000", lambda v: v >= 18000),
    (16, "offline, Llama-3.1-8B FP8 with the fp8 KV cache, 1024 x 1000/1000, output tok/s",
     ("kiln/offline_throughput", "llama3.1-8b fp8 kv-fp8 1024 req 1000 in / 1000 out", "output_tok_per_s"), [],
     ">= 18,000", lambda v: v >= 18000),
    *[
        (16, f"prefill of {n:,} tokens, Llama-3.1-8B bf16, share of the matmul ceiling",
         ("kiln/prefill_share", f"llama3.1-8b {n} tokens", "ratio"), [], ">= 0.85", lambda v: v >= 0.85)
        for n in (1024, 2048, 4096, 8192, 16384, 32768)
    ],
    (16, "served over HTTP/SSE / offline, same workload (benchmarks.served)",
     ("kiln/served", "llama3.1-8b", "served_over_offline"), [], ">= 0.95", lambda v: v >= 0.95),
    (16, "start-to-ready, Llama-2-7B engine dir with kernels/, s",
     ("kiln/startup_engine_kernels", "llama2-7b", "start_to_ready_s"), [], "<= 8", lambda v: v <= 8),
    (4, "time to first token, 128-token prompt, engine (kiln bench), ms",
     ("kiln/ttft", "llama2-7b batch 1", "ms"), [], "<= 15", lambda v: v <= 15),
    (4, "time to first token through an idle server (benchmarks.served), ms",
     ("kiln/served", "llama3.1-8b", "idle_ttft_ms"), [], "<= 15", lambda v: v <= 15),
]  # fmt: skip


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    devices = []
    for path in paths:
        data = json.loads(path.read_text())
        devices.append({"file": path.name, **data.get("device", {})})
        for row in data["results"]:
            key = (row["name"], row["shape"], row["metric"])
            runs = [*rows[key]["runs"], row["value"]] if key in rows else [row["value"]]
            rows[key] = {**row, "runs": runs}
    return list(rows.values()), devices


def _find(rows, name: str, shape_prefix: str, metric: str) -> dict[str, Any] | None:
    for row in rows:
        if row["name"] == name and row["shape"].startswith(shape_prefix) and row["metric"] == metric:
            return row
    return None


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def pivot(rows, prefix: str, metric: str) -> list[str]:
    """Markdown table: one line per shape, one column per implementation (the name after `prefix/`)."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    columns: list[str] = []
    for row in rows:
        if row["name"].startswith(prefix + "/") and row["metric"] == metric:
            column = row["name"].split("/", 1)[1]
            if column not in columns:
                columns.append(column)
            table[row["shape"]][column] = row["value"]
    if not table:
        return []
    lines = [f"| case | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for shape, values in table.items():
        cells = [_fmt(values[c]) if c in values else "–" for c in columns]
        lines.append(f"| {shape} | {' | '.join(cells)} |")
    return [f"**{prefix}** ({metric})", "", *lines, ""]


def markdown(rows, devices) -> str:
    out = ["# Kiln benchmark results", ""]
    for dev in devices:
        out.append(
            f"- `{dev['file']}`: {dev.get('gpu', '?')}, {dev.get('date_utc', '?')}, torch {dev.get('torch', '?')}, "
            f"triton {dev.get('triton', '?')}, transformers {dev.get('transformers', '?')}"
        )
    out += [
        "",
        "## Targets",
        "",
        "Issue 16's are set for one H200: a figure from another GPU says how far, not whether, it is met.",
        "",
        "| issue | target | Kiln | peers (same shapes, same GPU) | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for issue, label, (name, shape, metric), peers, goal, test in TARGETS:
        kiln = _find(rows, name, shape, metric)
        peer_text = ", ".join(
            f"{p[0].split('/')[1]} {_fmt(r['value'])}" for p in peers if (r := _find(rows, *p)) is not None
        )
        if kiln is None:
            value, met = "not measured", "–"
        else:
            value = ", ".join(_fmt(v) for v in kiln["runs"])
            verdicts = {test(v) for v in kiln["runs"]}
            met = "yes" if verdicts == {True} else "no" if verdicts == {False} else "not in every run"
        out.append(f"| {issue} | {label} | {value} | {peer_text or '–'} | {goal} | {met} |")
    out += ["", "## End to end", "", "| what | workload | metric | value |", "|---|---|---|---|"]
    for row in rows:
        if row["suite"] in ("kiln", "hf", "served", "startup", "prefill"):
            out.append(f"| {row['name']} | {row['shape']} | {row['metric']} | {_fmt(row['value'])} |")
    out += ["", "## Kernels", ""]
    for prefix, metric in [
        ("decode_attention", "us"),
        ("decode_attention", "GB_per_s"),
        ("prefill_attention", "TFLOP_per_s"),
        ("add_rms_norm", "GB_per_s"),
        ("silu_and_mul", "GB_per_s"),
        ("rotary_store_kv", "GB_per_s"),
    ]:
        out += pivot(rows, prefix, metric)
    return "\n".join(out) + "\n"


def _bar_label(row: dict[str, Any], run: int) -> str:
    shape = row["shape"].replace(", ", ",\n")
    label = f"{row['name']} {row['metric']}\n{shape}"
    return label + (f" (run {run + 1})" if len(row["runs"]) > 1 else "")


def plot(rows, path: Path) -> bool:
    """One PNG with a panel per kind of result present in `rows` (panels without data are left out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kernel_panels = [
        ("decode_attention", "us", ["triton_graph", "torch_sdpa_contiguous_graph"], "decode attention (us, lower is better)"),
        ("prefill_attention", "TFLOP_per_s", ["triton", "kiln_dispatch", "sdpa_cudnn_contiguous", "sdpa_flash_contiguous"],
         "prefill attention (TFLOP/s)"),
    ]  # fmt: skip
    bar_panels = [
        (["kiln/batch1_decode", "hf/generate_eager", "hf/generate_static_compiled"], ["ms_per_token"],
         "batch-1 decode, ms/token (lower is better)"),
        (["kiln/offline_throughput", "hf/generate_batch"], ["output_tok_per_s"], "offline throughput, output tok/s"),
        (["kiln/served"], ["served_output_tok_s", "offline_output_tok_s"],
         "served over HTTP/SSE against offline, output tok/s (one pair per run)"),
    ]  # fmt: skip
    kernels = [
        k
        for k in kernel_panels
        if any(r["name"].startswith(k[0] + "/") and r["metric"] == k[1] for r in rows)
    ]
    bars = [b for b in bar_panels if any(r["name"] in b[0] and r["metric"] in b[1] for r in rows)]
    count = len(kernels) + len(bars)
    if not count:
        return False
    fig, axes = plt.subplots((count + 1) // 2, 2, figsize=(15, 5 * ((count + 1) // 2)), squeeze=False)
    cells = [ax for row in axes for ax in row]
    for ax, (prefix, metric, columns, title) in zip(cells, kernels, strict=False):
        shapes = [r["shape"] for r in rows if r["name"] == f"{prefix}/{columns[0]}" and r["metric"] == metric]
        width = 0.8 / len(columns)
        for i, column in enumerate(columns):
            values = {
                r["shape"]: r["value"]
                for r in rows
                if r["name"] == f"{prefix}/{column}" and r["metric"] == metric
            }
            ax.bar(
                [j + width * i for j in range(len(shapes))],
                [values.get(s, 0) for s in shapes],
                width,
                label=column,
            )
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=60, ha="right", fontsize=7
        )
        ax.set_title(title)
        ax.legend(fontsize=8)
        if metric == "us":  # the cases span three orders of magnitude
            ax.set_yscale("log")
    for ax, (names, metrics, title) in zip(cells[len(kernels) :], bars, strict=False):
        # Every run of a row is a bar; full workload names, as two runs of one shape may differ only at the end.
        picked = [
            (_bar_label(r, i), v)
            for r in rows
            for m in metrics
            if r["name"] in names and r["metric"] == m
            for i, v in enumerate(r["runs"])
        ]
        ax.barh(range(len(picked)), [v for _, v in picked])
        ax.set_yticks(range(len(picked)), [label for label, _ in picked])
        for i, (_, v) in enumerate(picked):
            ax.text(v, i, f" {_fmt(v)}", va="center", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
    for ax in cells[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--png", type=Path, help="folder for benchmarks.png")
    args = parser.parse_args(argv)
    rows, devices = load(args.results)
    args.md.write_text(markdown(rows, devices))
    print(f"wrote {args.md}")
    if args.png and plot(rows, args.png / "benchmarks.png"):
        print(f"wrote {args.png / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
