"""Turn results JSON files (bench/timing.py's format) into a markdown report and one PNG of plots.

    python -m bench.report RESULTS.json [MORE.json ...] --md results.md --png DIR

Rules: only rows present in the files are shown (nothing is filled in); where several files hold
the same (name, shape, metric), the last one read wins; the markdown names the device and date of
each file. The plots need matplotlib; without it the markdown is still written.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

# Issue 4's targets: (label, kiln row, peer rows, goal text, goal test)
TARGETS = [
    (
        "batch-1 decode, Llama-2-7B fp16, ms/token",
        ("kiln/batch1_decode", "llama2-7b"),
        [("hf/generate_eager", "llama2-7b"), ("hf/generate_static_compiled", "llama2-7b")],
        "<= 5.0",
        lambda v: v <= 5.0,
    ),
    (
        "offline, Llama-3.1-8B bf16, 1024 x 128/128, output tok/s",
        ("kiln/offline_throughput", "llama3.1-8b 1024"),
        [("hf/generate_batch", "llama3.1-8b")],
        ">= 16,000",
        lambda v: v >= 16000,
    ),
    (
        "time to first token, 128-token prompt, engine (not yet through HTTP), ms",
        ("kiln/ttft", "llama2-7b"),
        [],
        "<= 15",
        lambda v: v <= 15,
    ),
]


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    devices = []
    for path in paths:
        data = json.loads(path.read_text())
        devices.append({"file": path.name, **data.get("device", {})})
        for row in data["results"]:
            rows[(row["name"], row["shape"], row["metric"])] = row
    return list(rows.values()), devices


def _find(rows, name: str, shape_prefix: str) -> dict[str, Any] | None:
    for row in rows:
        if row["name"] == name and row["shape"].startswith(shape_prefix):
            return row
    return None


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


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
        "| target | Kiln | peers (same shapes, same GPU) | goal | met |",
        "|---|---|---|---|---|",
    ]
    for label, (name, shape), peers, goal, test in TARGETS:
        kiln = _find(rows, name, shape)
        peer_text = ", ".join(
            f"{p[0].split('/')[1]} {_fmt(r['value'])}" for p in peers if (r := _find(rows, *p)) is not None
        )
        value = _fmt(kiln["value"]) if kiln else "not measured"
        met = ("yes" if test(kiln["value"]) else "no") if kiln else "–"
        out.append(f"| {label} | {value} | {peer_text or '–'} | {goal} | {met} |")
    out += ["", "## End to end", "", "| what | workload | metric | value |", "|---|---|---|---|"]
    for row in rows:
        if row["suite"] in ("kiln", "hf"):
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


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    panels = [
        (
            axes[0][0],
            "decode_attention",
            "us",
            ["triton_graph", "torch_sdpa_contiguous_graph"],
            "decode attention (us, lower is better)",
        ),
        (
            axes[0][1],
            "prefill_attention",
            "TFLOP_per_s",
            ["triton", "torch_sdpa_contiguous"],
            "prefill attention (TFLOP/s)",
        ),
    ]
    for ax, prefix, metric, columns, title in panels:
        shapes = [r["shape"] for r in rows if r["name"] == f"{prefix}/{columns[0]}" and r["metric"] == metric]
        for i, column in enumerate(columns):
            values = {
                r["shape"]: r["value"]
                for r in rows
                if r["name"] == f"{prefix}/{column}" and r["metric"] == metric
            }
            ax.bar(
                [j + 0.4 * i for j in range(len(shapes))],
                [values.get(s, 0) for s in shapes],
                0.4,
                label=column,
            )
        ax.set_xticks([j + 0.2 for j in range(len(shapes))], shapes, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
        if metric == "us":  # the cases span three orders of magnitude
            ax.set_yscale("log")
    for ax, names, metric, title in [
        (
            axes[1][0],
            ["kiln/batch1_decode", "hf/generate_eager", "hf/generate_static_compiled"],
            "ms_per_token",
            "batch-1 decode, ms/token (lower is better)",
        ),
        (
            axes[1][1],
            ["kiln/offline_throughput", "hf/generate_batch"],
            "output_tok_per_s",
            "offline throughput, output tok/s",
        ),
    ]:
        picked = [r for r in rows if r["name"] in names and r["metric"] == metric]
        # Full workload names: two runs of one shape differ only at the end (e.g. the batch cap).
        labels = [r["name"] + "\n" + r["shape"].replace(", ", ",\n") for r in picked]
        ax.barh(range(len(picked)), [r["value"] for r in picked])
        ax.set_yticks(range(len(picked)), labels)
        for i, r in enumerate(picked):
            ax.text(r["value"], i, f" {_fmt(r['value'])}", va="center", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
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
