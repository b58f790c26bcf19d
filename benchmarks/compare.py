"""Side-by-side table of two results files (benchmarks/timing.py's format): before and after a change.

    python -m benchmarks.compare BEFORE.json AFTER.json [--md OUT.md]

Rules: a row is (name, shape, metric); the table holds the rows both files have, in the after file's
order, with the change in percent (after over before, minus one). Where a file holds a row several
times, the last one counts. Nothing is judged here: what counts as noise is for the reader to say.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

Key = tuple[str, str, str]


def _rows(path: Path) -> tuple[dict[Key, float], str]:
    data: dict[str, Any] = json.loads(path.read_text())
    rows = {(r["name"], r["shape"], r["metric"]): float(r["value"]) for r in data["results"]}
    return rows, data.get("device", {}).get("gpu", "unknown device")


def compare_table(before: Path, after: Path) -> str:
    """Markdown: one line per row present in both files."""
    old, old_gpu = _rows(before)
    new, new_gpu = _rows(after)
    lines = [
        f"before: `{before}` ({old_gpu}); after: `{after}` ({new_gpu})",
        "",
        "| name | shape | metric | before | after | change |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for key, value in new.items():
        if key in old:
            change = f"{(value / old[key] - 1) * 100:+.1f}%" if old[key] else "–"
            lines.append(f"| {' | '.join(key)} | {old[key]:,.3f} | {value:,.3f} | {change} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--md", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    table = compare_table(args.before, args.after)
    print(table, end="")
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
