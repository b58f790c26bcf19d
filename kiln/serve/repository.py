"""`ModelRepository`: versioned engine directories on disk, the layout Triton Inference Server users know.

    DIR/
      <model>/
        1/   engine.json, weights, tokenizer  (a `kiln build` output)
        2/
        ...

Rules:
- A version is a directory whose name is a positive integer; anything else under the model is reported
  (`problem`) and never served. A version is valid when its `engine.json` loads (complete, not newer than
  this Kiln: `EngineManifest.load`); an engine still being written (no engine.json yet, as `kiln build`
  writes it last) is reported as not ready and looked at again on the next scan.
- The highest valid version serves at startup; a valid version above the serving one is a candidate.
- One server serves one model: `model` names it, or the repository must hold exactly one.
- Scanning only reads directories and engine.json files, so polling it every few seconds is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.engine_dir import MANIFEST_NAME, EngineManifest
from kiln.errors import InvalidEngineError


@dataclass(frozen=True, slots=True)
class VersionDir:
    """One entry under the model's directory: `number` None when the name is not a version."""

    name: str
    path: Path
    number: int | None
    problem: str | None  # None: a valid engine directory

    @property
    def valid(self) -> bool:
        return self.problem is None


class RepositoryError(ValueError):
    """The repository cannot be served as asked; the message says why and what to change."""


class ModelRepository:
    def __init__(self, root: str | Path, model: str | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise RepositoryError(f"the model repository {self.root} is not a directory")
        models = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if model is None:
            if len(models) != 1:
                found = ", ".join(models) or "none"
                raise RepositoryError(
                    f"{self.root} holds {len(models)} models ({found}); name one with --repository-model"
                )
            model = models[0]
        elif model not in models:
            raise RepositoryError(
                f"{self.root} has no model {model!r} (it has: {', '.join(models) or 'none'})"
            )
        self.model = model
        self.model_dir = self.root / model

    def scan(self) -> list[VersionDir]:
        """Every entry under the model's directory: versions ascending, then the rest by name."""
        entries = [_inspect(path) for path in self.model_dir.iterdir() if not path.name.startswith(".")]
        return sorted(entries, key=lambda e: (e.number is None, e.number or 0, e.name))

    def valid_versions(self) -> list[int]:
        return [e.number for e in self.scan() if e.valid and e.number is not None]

    def latest(self) -> VersionDir:
        """The highest valid version; RepositoryError naming each entry's problem when there is none."""
        entries = self.scan()
        valid = [e for e in entries if e.valid]
        if not valid:
            problems = "; ".join(f"{e.name}: {e.problem}" for e in entries) or "it is empty"
            raise RepositoryError(f"{self.model_dir} has no valid version ({problems})")
        return valid[-1]

    def version(self, number: int) -> VersionDir:
        """Version `number`, valid or not; KeyError when there is no such directory."""
        path = self.model_dir / str(number)
        if not path.is_dir():
            raise KeyError(number)
        return _inspect(path)


def _inspect(path: Path) -> VersionDir:
    name = path.name
    number = int(name) if name.isdecimal() and int(name) > 0 and name == str(int(name)) else None
    if number is None:
        return VersionDir(name, path, None, "not a version: versions are positive integers (1, 2, ...)")
    if not path.is_dir():
        return VersionDir(name, path, number, "not a directory")
    if not (path / MANIFEST_NAME).is_file():
        return VersionDir(name, path, number, f"no {MANIFEST_NAME} yet (not an engine, or still being built)")
    try:
        EngineManifest.load(path)
    except InvalidEngineError as exc:
        return VersionDir(name, path, number, str(exc))
    return VersionDir(name, path, number, None)
