"""The layering contract, read from the source with ``ast``: imports flow cli -> api -> actors
-> runtime only, ``runtime`` stays free of Trio and the web stack, no two modules import each
other (directly or around a loop), and the request records import without MLX.

Every import statement counts, wherever it is: at the top, inside a function (a lazy import
is still a dependency) or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "actors", "api", "cli")
# Each package and the packages it must never import.
FORBIDDEN = {
    "runtime": ("actors", "api", "cli", "trio", "quart", "quart_trio", "hypercorn"),
    "actors": ("api", "cli"),
    "api": ("cli",),
}
# A cycle someone else is removing (issue 8); delete this entry once it is gone.
KNOWN_CYCLES: list[set[str]] = []
# What the HTTP layer and the actors exchange must be importable without MLX (a client, the
# request schemas, the command line's parser).
MLX_FREE = (
    "api.schemas",
    "actors.messages",
    "cli.main",
    "runtime.engine.options",
    "runtime.formats.model_files",
    "runtime.store.layout",
)


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (``from a import b``: ``a.b``,
    which may be a module or just a name in ``a``)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = module.split(".")
            # ``from . import x`` in a package's __init__ is relative to the package itself.
            anchor = parts[: len(parts) - node.level + is_package] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base:
                names.add(base)
            names.update(".".join(filter(None, (base, alias.name))) for alias in node.names)
    return names


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """``{module: the project modules it imports}`` (a name resolves to its closest module)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(name) for name in imported_names(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(modules: Mapping[str, Path]) -> list[str]:
    """``module imports name`` for each import ``FORBIDDEN`` rules out."""
    out = []
    for module, path in modules.items():
        banned = FORBIDDEN.get(module.partition(".")[0], ())
        for name in sorted(imported_names(module, path)):
            if name.partition(".")[0] in banned:
                out.append(f"{module} imports {name}")
    return out


# ---- the project ----


def test_imports_flow_one_way_and_runtime_has_no_trio() -> None:
    modules = module_files(ROOT, PACKAGES)
    assert len(modules) > 40  # the walk found the code
    assert violations(modules) == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph(module_files(ROOT, PACKAGES)))
    assert [c for c in found if c not in KNOWN_CYCLES] == []


def test_request_records_import_without_mlx() -> None:
    # `import runtime` preloads BLAS with ctypes first: that is not MLX.
    code = (
        "import importlib, sys\n"
        f"for name in {MLX_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.'))\n"
        "print(loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- the checker itself catches what it is meant to ----


def _tree(root: Path, files: Mapping[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(root, {name.split("/")[0] for name in files})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("import trio\n", "runtime.core imports trio"),
        ("def f():\n    from actors.tree import x\n", "runtime.core imports actors.tree.x"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import api.app\n",
            "runtime.core imports api.app",
        ),
    ],
)
def test_forbidden_imports_are_found_wherever_they_are(
    tmp_path: Path, text: str, expected: str
) -> None:
    modules = _tree(tmp_path, {"runtime/__init__.py": "", "runtime/core.py": text})
    assert expected in violations(modules)


def test_cycles_are_found_through_any_import(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "def f():\n    from pkg import c\n",
            "pkg/c.py": "from . import a\n",
            "pkg/d.py": "import pkg.a\n",
        },
    )
    assert cycles(import_graph(modules)) == [{"pkg.a", "pkg.b", "pkg.c"}]
