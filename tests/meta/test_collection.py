"""The collection check of tests/conftest.py: a plain `pytest` fails when a test file is never collected."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path, norecursedirs: list[str] | None) -> Path:
    (tmp_path / "tests" / "build").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_top.py").write_text("def test_top():\n    pass\n")
    (tmp_path / "tests" / "build" / "test_hidden.py").write_text("def test_hidden():\n    pass\n")
    lines = ["[tool.pytest.ini_options]", 'testpaths = ["tests"]']
    if norecursedirs is not None:
        lines.append("norecursedirs = [" + ", ".join(f'"{d}"' for d in norecursedirs) + "]")
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return tmp_path


def _pytest(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_folder_hidden_by_the_default_norecursedirs_fails_the_run(tmp_path: Path) -> None:
    run = _pytest(_project(tmp_path, norecursedirs=None))  # pytest's default list skips "build"
    assert run.returncode != 0
    assert "tests/build/test_hidden.py" in run.stdout + run.stderr


def test_this_projects_settings_collect_every_folder(tmp_path: Path) -> None:
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    run = _pytest(_project(tmp_path, norecursedirs=ours["norecursedirs"]))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
