"""The house rules of allmil_cli/ (docs/architecture.md): imports point one way, and no module grows past 400 lines.

The import graph is read from the source with ``ast``, so every import counts: module level, inside functions, under
``if TYPE_CHECKING:``, relative ones. Nodes are modules (``allmil_cli.pipeline.runner``); ``from pkg import name`` points at
``pkg.name`` when that is a module, else at ``pkg``.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "allmil_cli"
MAX_LINES = 400

#: The layers, bottom first (docs/architecture.md): each is a folder of allmil_cli/. A module may import its own layer
#: and those below, never above. ``allmil_cli/__init__.py`` (the version) sits below them all and imports nothing;
#: ``__main__`` belongs to the CLI; ``train/`` (torch, run by hand) is held to the no-cycle rule only.
LAYERS = ("types", "stages", "executors", "pipeline", "io", "cli")
OUTSIDE = ("train",)


def module_name(path: Path, root: Path) -> str:
    """``root/allmil_cli/train/mil.py`` -> ``allmil_cli.train.mil``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in its source."""
    root = package_dir.parent
    files = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [_longest_known(a.name, known) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if is_package else mod.split(".")[:-1]
                    up = here[: len(here) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else _longest_known(base, known))
            graph[mod].update(t for t in targets if t and t != mod)
    return graph


def _longest_known(name: str, known: set[str]) -> str:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return ""


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph has none (depth-first, in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def upward_imports(graph: Mapping[str, set[str]], layers: tuple[str, ...] = LAYERS, prefix: str = "allmil_cli") -> list[str]:
    """``a -> b`` for every import from a module of a layer into a module of a higher layer."""
    def rank(m: str) -> int | None:
        parts = m.split(".")
        if parts == [prefix]:
            return -1
        if parts[:2] == [prefix, "__main__"]:
            return len(layers) - 1
        return layers.index(parts[1]) if len(parts) > 1 and parts[1] in layers else None

    def name(r: int | None) -> str:
        return "root" if r == -1 else layers[r] if r is not None else "-"

    return sorted(f"{a} ({name(rank(a))}) -> {b} ({name(rank(b))})" for a, targets in graph.items() for b in targets
                  if rank(a) is not None and rank(b) is not None and rank(b) > rank(a))


# -- the package -------------------------------------------------------------------------------------------------
def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    bad = upward_imports(import_graph(PACKAGE))
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_every_module_of_the_package_lives_in_a_layer_folder():
    """A new module goes into one of the layer folders (see docs/architecture.md), so its imports are checked."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert not loose, f"modules outside the layer folders: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(LAYERS + OUTSIDE)


def test_the_package_root_imports_nothing_of_its_own():
    assert import_graph(PACKAGE)["allmil_cli"] == set()


def test_the_executors_never_import_the_pipeline():
    graph = import_graph(PACKAGE)
    executors = [m for m in graph if m.startswith("allmil_cli.executors.")]
    assert len(executors) >= 6
    for mod in executors:
        assert not any(t.startswith("allmil_cli.pipeline") for t in graph[mod]), mod


def long_modules(package_dir: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """Module -> its line count, for every module of the package (subpackages too) over ``limit`` lines."""
    counts = {module_name(p, package_dir.parent): len(p.read_text().splitlines()) for p in sorted(package_dir.rglob("*.py"))}
    return {m: n for m, n in counts.items() if n > limit}


def test_no_module_is_over_400_lines():
    long = long_modules(PACKAGE)
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


# -- the checks themselves catch violations ------------------------------------------------------------------------
def test_the_cycle_finder_finds_a_cycle_and_only_a_real_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None  # a diamond is no cycle
    assert find_cycle({}) is None


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("how", ["function", "type_checking", "relative", "from_package"])
def test_hidden_imports_still_make_a_cycle(tmp_path, how):
    """Imports inside functions, under TYPE_CHECKING, relative or as ``from pkg import module`` are edges too."""
    back = {  # pkg/sub/b.py's way back to pkg/a.py
        "function": "def f():\n    from pkg.a import A\n    return A\n",
        "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n",
        "relative": "from ..a import A\n",
        "from_package": "from pkg import a\n",
    }[how]
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.sub.b import B\nA = 1\n",
                            "pkg/sub/__init__.py": "", "pkg/sub/b.py": "B = 2\n" + back})
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_an_upward_import_is_reported(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/bottom/__init__.py": "", "pkg/top/__init__.py": "",
                            "pkg/bottom/low.py": "import pkg.top.high\n", "pkg/top/high.py": "import pkg.bottom.low\n"})
    bad = upward_imports(import_graph(pkg), ("bottom", "top"), "pkg")
    assert bad == ["pkg.bottom.low (bottom) -> pkg.top.high (top)"]


def test_a_long_module_is_reported(tmp_path):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/ok.py": "x = 1\n" * MAX_LINES,
                            "pkg/sub/__init__.py": "", "pkg/sub/big.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_modules(pkg) == {"pkg.sub.big": MAX_LINES + 1}
