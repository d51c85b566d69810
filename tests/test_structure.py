"""Structural facts of the package, read from its source (issue: one engine, one vocabulary).

- no import cycle between mechsteer modules (function-level imports included);
- no hook-name template or literal outside ``mechsteer/sites.py``;
- no subpackage imports another package's private (``_``) module;
- no method package imports ``report`` or ``cli`` (presentation runs one way);
- no file over 400 lines;
- the flat public API imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mechsteer"
MAX_LINES = 400
METHOD_PACKAGES = ("attribution", "interventions", "fv", "tasks")
PRESENTATION = {"mechsteer.report", "mechsteer.cli", "mechsteer.demo", "mechsteer._cli_args"}
HOOK_RE = re.compile(r"(\bhook_(?!name\b)[a-z_]+|\bblocks\.\{|\bblocks\.\d+\.|ln_final\.|unembed\.hook)")
SITE_MODULES = {"mechsteer/sites.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every mechsteer module ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def test_no_import_cycle():
    # A package's __init__ re-exporting its own children is not a cycle of logic: drop edges
    # from a package to the modules inside it.
    graph = {n: {m for m in deps if not (_is_package(n) and m.startswith(n + "."))} for n, deps in GRAPH.items()}
    # Importing ``mechsteer.x.y`` runs ``mechsteer.x``'s __init__ first: a child importing
    # its own parent package is fine only if the parent does not need it back.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_hook_names_outside_sites():
    bad = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(PKG.parent))
        if rel in SITE_MODULES:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if HOOK_RE.search(node.value):
                    bad.append(f"{rel}:{node.lineno}: {node.value[:60]!r}")
    assert not bad, "hook names outside the site module:\n" + "\n".join(bad)


def test_no_private_imports_across_packages():
    bad = []
    for name, deps in GRAPH.items():
        own = name.rsplit(".", 1)[0] if not _is_package(name) else name
        for dep in deps:
            parent, _, leaf = dep.rpartition(".")
            if leaf.startswith("_") and not leaf.startswith("__") and parent != "mechsteer":
                if not (own == parent or own.startswith(parent + ".")):
                    bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(bad)


def test_methods_do_not_import_presentation():
    bad = [
        f"{n} imports {d}"
        for n, deps in GRAPH.items()
        if n.split(".")[1:2] and n.split(".")[1] in METHOD_PACKAGES
        for d in deps
        if d in PRESENTATION
    ]
    assert not bad, "\n".join(bad)


def test_no_file_over_400_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize(
    "statement",
    [
        "from mechsteer.attribution import activation_patching, attribution_patching_all, direct_logit_attribution, attnlrp, compare",
        "from mechsteer import load_model, activation_patching, attribution_patching, dla, attnlrp, compare, train, evaluate",
        "from mechsteer import ActivScalar, SteerVec, DynScalar, Intervention, run_fv, FunctionVector, DistributedFV",
        "from mechsteer.runs import cache_at, grad_at",
    ],
)
def test_public_api(statement):
    exec(statement, {})
