"""The package's layers (docs/architecture.md): every import, also those inside functions, points
down or sideways within a sub-package; there is no import cycle; the pure method does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "wsigen"

# lowest first; a module may import its own layer's modules and those of lower layers only
LAYERS = [
    ("base", ["wsigen.errors", "wsigen.faults", "wsigen.version"]),
    ("method", ["wsigen.method"]),
    ("nets", ["wsigen.nets"]),
    ("slides", ["wsigen.slides"]),
    ("run", ["wsigen.run"]),
    ("judge", ["wsigen.judge"]),
    ("apps", ["wsigen.training", "wsigen.view"]),  # peers: neither imports the other
    ("api", ["wsigen.api", "wsigen"]),  # the package re-exports the API's functions lazily
    ("cli", ["wsigen.cli"]),
]
# what the pure method may import from outside the package
PURE_ALLOWED = {"__future__", "collections", "contextlib", "dataclasses", "functools", "itertools", "math",
                "typing", "numpy", "torch"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
    return out


def layer_of(mod: str) -> tuple[int, str]:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (rank, p)
    assert best is not None, f"{mod} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {m: [(d, line) for d, line in imports_of(m, p, known) if d in known and d != m]
            for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_points_up_or_across_peers():
    bad = []
    for m, deps in graph().items():
        rank, home = layer_of(m)
        for d, line in deps:
            drank, dhome = layer_of(d)
            peers = LAYERS[rank][0] == "apps" and dhome != home
            if drank > rank or (drank == rank and peers):
                bad.append(f"{m}:{line} imports {d} ({LAYERS[drank][0]} from {LAYERS[rank][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = {m: sorted({d for d, _ in deps}) for m, deps in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in g[m]:
            if d == "wsigen" or m == "wsigen":  # the package's lazy API re-export, not a dependency
                continue
            if state.get(d) == 1:
                cycles.append(" → ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_pure_method_imports_no_io():
    mods = modules()
    bad = []
    for m, p in mods.items():
        if not m.startswith("wsigen.method"):
            continue
        for d, line in imports_of(m, p, set(mods)):
            top = d.split(".")[0]
            if top == "wsigen":
                if layer_of(d)[0] > 1:
                    bad.append(f"{m}:{line} imports {d}")
            elif top not in PURE_ALLOWED:
                bad.append(f"{m}:{line} imports {d}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("src, ok", [
    ("from ..api import sample\n", False),         # slides → api: up
    ("from ..method import edm\n", True),          # slides → method: down
    ("def f():\n    from ..run import launch\n", False),  # inside a function still counts
])
def test_the_check_catches_an_upward_import(tmp_path, src, ok):
    """The walker sees a planted import (so the layer test can fail)."""
    f = tmp_path / "probe.py"
    f.write_text(src)
    deps = imports_of("wsigen.slides.probe", f, set(modules()))
    rank = layer_of("wsigen.slides.probe")[0]
    assert all(layer_of(d)[0] <= rank for d, _ in deps) is ok
