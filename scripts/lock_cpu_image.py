"""Write docker/requirements-cpu.lock: the CPU image's Python packages, every one pinned.

Kiln's runtime dependencies (pyproject.toml) with torch's CPU build in place of the `torch` range, resolved
by pip for the Python running this script, which must be the CPU image's (3.11, Linux x86-64), through
this machine's pip configuration (its indexes, and the folder or index holding the CPU torch wheel):

    python scripts/lock_cpu_image.py > docker/requirements-cpu.lock

Run it again whenever pyproject.toml's dependencies change (tests/unit/test_trtllm_docker.py checks that
the lock pins each of them within its range).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0+cpu"  # PyTorch's CPU build: no CUDA libraries in the image


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit("run this with Python 3.11, the CPU image's")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [TORCH if canonical(Requirement(d).name) == "torch" else d for d in dependencies]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in.txt").write_text("\n".join(wanted) + "\n")
        pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        subprocess.run([*pip, "--report", f"{tmp}/report.json", "-r", f"{tmp}/in.txt"], check=True)
        report = json.loads((Path(tmp) / "report.json").read_text())
    environment = report["environment"]
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    via: dict[str, set[str]] = {name: set() for name in pins}
    for direct in wanted:
        via[canonical(Requirement(direct).name)].add("kiln")
    for item in report["install"]:
        for line in item["metadata"].get("requires_dist", []):
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({**environment, "extra": ""}):
                continue
            if canonical(requirement.name) in via:
                via[canonical(requirement.name)].add(canonical(item["metadata"]["name"]))
    print("# Pinned Python packages of the CPU image (target `cpu`): Python 3.11, Linux x86-64, torch's CPU")
    print("# build. Written by `python scripts/lock_cpu_image.py > docker/requirements-cpu.lock`.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
        print(f"    # via {', '.join(sorted(via[name]))}")


if __name__ == "__main__":
    main()
