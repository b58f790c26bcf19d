"""benchmarks.compare: the before/after table holds the rows both files have, with the change."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.compare import compare_table, main


def _write(path: Path, rows: list[tuple[str, str, str, float]], gpu: str = "NVIDIA H200") -> Path:
    results = [{"suite": "s", "name": n, "shape": s, "metric": m, "value": v} for n, s, m, v in rows]
    path.write_text(json.dumps({"device": {"gpu": gpu}, "results": results}))
    return path


def test_rows_in_both_files_with_their_change(tmp_path: Path) -> None:
    before = _write(
        tmp_path / "before.json",
        [
            ("kiln/batch1_decode", "llama2-7b", "ms_per_token", 4.0),
            ("kiln/offline", "llama3.1-8b", "output_tok_s", 17000.0),
            ("kiln/offline", "llama3.1-8b", "output_tok_s", 16000.0),  # the last one counts
            ("only/before", "x", "m", 1.0),
        ],
    )
    after = _write(
        tmp_path / "after.json",
        [
            ("kiln/offline", "llama3.1-8b", "output_tok_s", 16800.0),
            ("kiln/batch1_decode", "llama2-7b", "ms_per_token", 3.9),
            ("only/after", "x", "m", 1.0),
        ],
    )
    lines = compare_table(before, after).splitlines()
    assert lines[0].endswith("(NVIDIA H200)")
    body = lines[4:]
    assert body == [
        "| kiln/offline | llama3.1-8b | output_tok_s | 16,000.000 | 16,800.000 | +5.0% |",
        "| kiln/batch1_decode | llama2-7b | ms_per_token | 4.000 | 3.900 | -2.5% |",
    ]


def test_main_writes_the_markdown(tmp_path: Path, capsys) -> None:
    before = _write(tmp_path / "b.json", [("n", "s", "m", 2.0)])
    after = _write(tmp_path / "a.json", [("n", "s", "m", 1.0)])
    assert main([str(before), str(after), "--md", str(tmp_path / "c.md")]) == 0
    assert "| n | s | m | 2.000 | 1.000 | -50.0% |" in (tmp_path / "c.md").read_text()
    assert capsys.readouterr().out == (tmp_path / "c.md").read_text()
