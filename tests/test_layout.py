"""The package's architecture, read from the source with ``ast`` (nothing is imported).

One package per pipeline stage, imports pointing one way: no import cycle between modules (module-level
and function-level imports alike) nor between the stage packages, no private name imported across
packages, a short flat top level, no mid-file import, rowsft imports inside functions only where a
command's start-up time asks for them, and plotly / ipywidgets only in the figure and widget layers.
See docs/architecture.md for the picture.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rowsft"
MAX_TOP_LEVEL_MODULES = 15
LAZY_IMPORTS_ALLOWED = {"rowsft.cli.commands"}          # `rowsft --help` must not import torch
UI_LIBRARIES = {"plotly": ("rowsft.viz", "rowsft.notebook"), "ipywidgets": ("rowsft.notebook",),
                "anywidget": ("rowsft.notebook",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def stage(module: str) -> str:
    """The top-level package or module a module belongs to (``rowsft.layers.tuner`` → ``layers``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def absolute(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str):
    """``(target module, imported name or None, node)`` for every rowsft import of ``module``."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, module)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                yield (target, None, node) if target in MODULES else (source, alias.name, node)


def rowsft_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in imports(module):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("rowsft") and target != module and target != "rowsft":
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(rowsft_edges()) == []


def test_stage_packages_import_one_way():
    """Package-level cycles break at run time even when the module graph has none (a package's
    ``__init__`` imports its modules), so the stages themselves must form a DAG."""
    stage_edges: dict[str, set[str]] = {}
    for module, targets in rowsft_edges().items():
        for target in targets:
            if stage(module) and stage(target) and stage(module) != stage(target):
                stage_edges.setdefault(stage(module), set()).add(stage(target))
    assert cycles(stage_edges) == []


def test_no_private_name_crosses_a_package():
    def package_of(m: str) -> str:
        return m if MODULES[m].name == "__init__.py" else m.rpartition(".")[0]
    crossing = []
    for module in MODULES:
        for target, name, _ in imports(module):
            if name and name.startswith("_") and not name.startswith("__") and target in MODULES \
                    and package_of(target) != package_of(module):
                crossing.append(f"{module} imports {name} from {target}")
    assert crossing == []


def test_top_level_stays_short():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= MAX_TOP_LEVEL_MODULES, flat


def test_imports_stand_at_the_top_of_each_module():
    """No mid-file import, and rowsft imports inside functions only where start-up time needs them."""
    late, nested = [], []
    for module, tree in TREES.items():
        seen_code = False
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if seen_code:
                    late.append(f"{module}:{node.lineno}")
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                nested.append(f"{module}:{node.lineno} (TYPE_CHECKING block)")
            elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                seen_code = True
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and module not in LAZY_IMPORTS_ALLOWED:
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("rowsft")):
                        nested.append(f"{module}:{node.lineno}")
    assert late == [] and nested == []


@pytest.mark.parametrize("library", sorted(UI_LIBRARIES))
def test_ui_libraries_only_in_the_figure_and_widget_layers(library):
    users = sorted({module for module, tree in TREES.items() for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    and any((n.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] == library
                            for n in node.names)})
    allowed = UI_LIBRARIES[library]
    assert [m for m in users if not m.startswith(allowed)] == []


def test_the_checks_see_a_cycle_and_a_private_import():
    """The checks above can fail: a made-up graph with a cycle is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
