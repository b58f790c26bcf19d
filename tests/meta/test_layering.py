"""The import floors of docs/architecture.md, checked on the source.

Rules:
- Every module of `kiln` belongs to one unit of `FLOORS`; a unit may import only units on lower floors
  (and itself). `if TYPE_CHECKING:` imports count: a type is a dependency too.
- No import loop between modules, counting imports inside functions (they run later, but a loop is a
  loop) and leaving out `TYPE_CHECKING` imports (they never run).
- An import inside a function defers a heavy or optional dependency (torch, FastAPI, Triton,
  TensorRT-LLM, aiohttp) and says so in a comment on its line or the line above; anything else belongs
  at the top of the module.
- The package root (`kiln/__init__.py`) is the public facade and may load any floor lazily.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "kiln"

# Bottom first. A unit is a module or a package of kiln.
FLOORS: list[set[str]] = [
    {"kiln.version", "kiln.errors", "kiln.config", "kiln.progress"},
    {"kiln.engine_dir", "kiln.kvcache"},
    {"kiln.kernels"},  # Triton kernels, their PyTorch references, tiles, the kernel cache
    {"kiln.models"},
    {"kiln.engine"},  # requests, scheduler, runner, sampler, graphs, LLMEngine
    {"kiln.trtllm"},  # translations between Kiln and TensorRT-LLM 1.2
    {"kiln.clients"},  # EngineClient and its drivers
    {"kiln.build"},
    {"kiln.serve"},
    {"kiln.llm", "kiln.bench"},
    {"kiln.cli"},
]
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # importing module
    target: str  # imported kiln module
    line: int
    in_function: bool
    type_only: bool
    commented: bool


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["kiln", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _targets(source: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = source.split(".")[: len(source.split(".")) - node.level + is_package]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
        ]
    for name in names:
        if name == "kiln" or name.startswith("kiln."):
            yield _resolve(name)


def _says_why(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or above the run of import lines (blank lines allowed) it is in."""
    if "#" in lines[lineno - 1]:
        return True
    row = lineno - 2
    while row >= 0 and (not lines[row].strip() or lines[row].strip().startswith(("from ", "import "))):
        if "#" in lines[row]:
            return True
        row -= 1
    return row >= 0 and "#" in lines[row] and lines[row].strip().startswith(("#", "from ", "import "))


def _module_imports(source: str, path: Path) -> list[Import]:
    text = path.read_text()
    lines = text.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                commented = _says_why(lines, child.lineno)
                for target in _targets(source, child, path.name == "__init__.py"):
                    if target != source:
                        found.append(Import(source, target, child.lineno, in_function, type_only, commented))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_function, True)
            else:
                nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, in_function or nested, type_only)

    visit(ast.parse(text), False, False)
    return found


IMPORTS = [imp for source, path in MODULES.items() for imp in _module_imports(source, path)]


def _unit(module: str) -> str | None:
    while module and module not in FLOOR:
        module = module.rpartition(".")[0]
    return module or None


def test_every_module_has_a_floor() -> None:
    assert sorted(m for m in MODULES if m != "kiln" and _unit(m) is None) == []


def test_no_module_imports_a_higher_or_sideways_floor() -> None:
    bad = []
    for imp in IMPORTS:
        if imp.source == "kiln" or imp.target == "kiln":
            continue
        src, dst = _unit(imp.source), _unit(imp.target)
        if src != dst and FLOOR[dst] >= FLOOR[src]:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({src} is not above {dst})")
    assert bad == []


def test_no_import_loop() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if not imp.type_only and "kiln" not in (imp.source, imp.target):
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert loops == []


def test_function_level_imports_say_why() -> None:
    silent = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in IMPORTS
        if imp.in_function and not imp.type_only and imp.source != "kiln" and not imp.commented
    ]
    assert silent == []
