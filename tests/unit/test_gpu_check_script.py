"""scripts/gpu_check.sh leaves few files in $OUT: the device tool brings back at most eight from a call."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _run(out: Path | None, *stages: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=60)


def test_with_out_set_everything_but_the_summaries_is_packed(tmp_path: Path) -> None:
    for name in ("results.json", "results.md", "targets.done", "run.log", "served.log"):
        (tmp_path / name).write_text(name)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "step.txt").write_text("profile")
    result = _run(tmp_path, "no-such-stage")  # no GPU needed: the stage is refused, the exit still packs
    assert result.returncode == 2 and "unknown stage no-such-stage" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json", "results.md", "results.tgz", "targets.done"
    ]  # fmt: skip
    with tarfile.open(tmp_path / "results.tgz") as archive:
        assert sorted(archive.getnames()) == ["profiles", "profiles/step.txt", "run.log", "served.log"]
        assert archive.extractfile("profiles/step.txt").read() == b"profile"


def test_an_out_with_only_the_summaries_gets_no_archive(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    assert _run(tmp_path, "no-such-stage").returncode == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
