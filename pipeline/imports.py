"""Which of the project's own files a step's code imports (the code deps dvc.yaml declares).

An AST walk, not an import: every ``import``/``from ... import`` statement in a module counts,
those inside functions included (heavy imports are made lazily, inside the function that
needs them, so importing a stage module and reading ``sys.modules`` would miss most of them).
The walk follows ``pipeline.*`` and ``stages.*`` modules transitively; importing ``a.b.c``
also runs ``a/__init__.py`` and ``a/b/__init__.py``, so those count too. The result is a
superset of what one run executes (a branch not taken still counts), which is the safe side
for a dependency list.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")

# Not followed further: the params schema imports every source module only to build the
# `source` section's type, and clean's rules (pipeline/quality/rules.py) and review's finders
# (pipeline/quality/finders.py) only to compose the `clean` and `review` sections from their
# params; a source shapes collect's output alone, a rule clean's, a finder review's, and
# collect, clean and review import those modules themselves.
LEAVES = frozenset({"pipeline.config"})

# Imported by steps but never shaping an output, so not a code dep (a change to one of them
# must not re-run the pipeline): empty package markers, the terminal, the run records written
# beside the outputs (never in them), the error type, and the registry and runner, whose
# paths are dvc.yaml's own (DVC tracks that file itself; tests/test_registry.py keeps them equal).
NEUTRAL = frozenset({
    "pipeline/__init__.py", "stages/__init__.py", "pipeline/console.py", "pipeline/resources.py",
    "pipeline/errors.py", "pipeline/steps.py", "pipeline/runner.py",
})

# Every step is configured through the params schema: its defaults decide results too.
SCHEMA = ("pipeline/config.py", "pipeline/schema.py")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """``pipeline.sources.csv`` -> pipeline/sources/csv.py (or the package's __init__.py)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@lru_cache(maxsize=None)
def _import_names(name: str, root: Path = ROOT) -> frozenset[str]:
    """Every dotted name one module's import statements name (relative ones resolved)."""
    path = module_file(name, root)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a import b`: b is a submodule or a name defined in a.
            found.add(base)
            if base.split(".")[0] in PACKAGES:
                found.update(f"{base}.{a.name}" for a in node.names)
    return frozenset(found)


@lru_cache(maxsize=None)
def direct_imports(name: str, root: Path = ROOT) -> frozenset[str]:
    """The project modules one module's source names in import statements."""
    found: set[str] = set()
    for n in _import_names(name, root):
        if n.split(".")[0] in PACKAGES:
            found.update(m for m in _with_parents(n) if module_file(m, root) is not None)
    found.discard(name)
    return frozenset(found)


def imported_modules(module: str, root: Path = ROOT, leaves: frozenset[str] = LEAVES) -> set[str]:
    """Every project module ``module`` reaches through imports, by dotted name (not following
    the imports of ``leaves``)."""
    seen: set[str] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen or module_file(name, root) is None:
            continue
        seen.add(name)
        if name not in leaves:
            todo.extend(direct_imports(name, root))
    return seen


def imported_files(module: str, root: Path = ROOT, leaves: frozenset[str] = LEAVES) -> set[str]:
    """Every project file ``module`` reaches through imports, as repo-relative POSIX paths
    (not following the imports of ``leaves``)."""
    return {module_file(n, root).relative_to(root).as_posix() for n in imported_modules(module, root, leaves)}


def libraries_imported(modules, root: Path = ROOT) -> set[str]:
    """The modules outside the project and the standard library that ``modules`` name in
    import statements (``import onnx``, ``from sklearn.metrics import f1_score`` ->
    ``sklearn.metrics``), lazy ones inside functions included."""
    return {n for m in modules for n in _import_names(m, root)
            if n and n.split(".")[0] not in PACKAGES and n.split(".")[0] not in sys.stdlib_module_names}


def schema_files(root: Path = ROOT) -> set[str]:
    """Every file the params schema is composed of (``pipeline/config.py`` followed past its
    leaf mark: sources, clean's rules, review's finders). A step that writes the whole resolved
    spec (package's ``lineage.json`` records every section, defaults filled in) depends on all of
    them: a finder's changed default changes the package."""
    return imported_files("pipeline.config", root, leaves=frozenset()) - NEUTRAL


def code_deps(module: str, root: Path = ROOT) -> set[str]:
    """The files whose change may change what the step in ``module`` writes."""
    return (imported_files(module, root) | set(SCHEMA)) - NEUTRAL


def expand(paths, root: Path = ROOT) -> set[str]:
    """Declared deps as files: a directory stands for every .py file under it."""
    out: set[str] = set()
    for p in paths:
        full = root / p
        if full.is_dir():
            out.update(f.relative_to(root).as_posix() for f in full.rglob("*.py"))
        else:
            out.add(p)
    return out


def collapse(files: set[str], root: Path = ROOT) -> list[str]:
    """``files`` as a dep list: a package directory whose every .py file is in it, as the directory."""
    dirs = sorted({str(Path(f).parent) for f in files if Path(f).parent != Path(".")}, key=len)
    chosen: list[str] = []
    covered: set[str] = set()
    for d in dirs:
        if any(d == c or d.startswith(c + "/") for c in chosen) or d in PACKAGES:
            continue
        inside = expand([d], root)
        if inside and inside <= files:
            chosen.append(d)
            covered |= inside
    return sorted(chosen + [f for f in files if f not in covered])


# ---------------------------------------------------------------- the layers

def project_modules(root: Path = ROOT) -> list[str]:
    """Every module of ``pipeline`` and ``stages`` by its dotted name (packages by their own)."""
    names = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def unit(name: str, root: Path = ROOT) -> str:
    """The layer ``name`` belongs to: its subpackage of ``pipeline`` (``pipeline.inference``),
    a top-level module itself (``pipeline.serving``), ``stages`` (the glue), or the command
    line (``pipeline.cli`` with its sub-apps ``pipeline/*_cli.py``, which it registers)."""
    parts = name.split(".")
    if parts[0] == "stages":
        return "stages"
    if len(parts) == 2 and parts[1].endswith("_cli"):
        return "pipeline.cli"
    if len(parts) > 1 and (root / "pipeline" / parts[1]).is_dir():
        return ".".join(parts[:2])
    return name


def unit_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Which units each unit imports (lazy imports included; the ``pipeline`` package's own
    ``__init__``, which every import runs, is not a unit)."""
    graph: dict[str, set[str]] = {}
    for name in project_modules(root):
        if name == "pipeline":
            continue
        mine = unit(name, root)
        graph.setdefault(mine, set()).update(
            unit(m, root) for m in direct_imports(name, root) if m != "pipeline" and unit(m, root) != mine)
    return graph


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each unit's level: 1 for one that imports no other, else 1 + the highest it imports.

    Raises ``ValueError`` naming the cycle when units import each other (then no unit of
    the cycle is below the others, and an import "runs back up" the layers).
    """
    level: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> int:
        if node in level:
            return level[node]
        if node in path:
            cycle = path[path.index(node):] + [node]
            raise ValueError("import cycle: " + " -> ".join(cycle))
        path.append(node)
        level[node] = 1 + max((visit(m) for m in sorted(graph.get(node, ()))), default=0)
        path.pop()
        return level[node]

    for node in sorted(graph):
        visit(node)
    return level
