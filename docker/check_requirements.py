"""Fail the image build when an installed package does not satisfy Kiln's own requirements.

Kiln is installed with --no-deps on top of the base image's torch/transformers/... (replacing them
would break tensorrt_llm), so this checks those versions against kiln's [project.dependencies].
Narrower than `pip check`, which also fails on conflicts among the base image's own packages.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement


def find_problems(requirements: list[str]) -> list[str]:
    """One line per requirement the installed packages do not meet; optional extras are skipped."""
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # belongs to an optional extra (test, bench, trtllm)
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed (kiln needs {requirement})")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version} is installed, kiln needs {requirement}")
    return problems


if __name__ == "__main__":
    found = find_problems(metadata.requires("kiln") or [])
    for problem in found:
        print(f"check_requirements: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
