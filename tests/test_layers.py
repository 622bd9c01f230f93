"""The import graph of causal/: every import points down the layers, and no import cycle exists.

Every import counts: at module level, inside functions and under TYPE_CHECKING alike, so a layer cannot
lean on a later one by hiding the import. docs/architecture.md, "Layers", says why each layer sits where.
"""
from __future__ import annotations

import ast
from pathlib import Path

import causal

PACKAGE = Path(causal.__file__).parent
DOC = PACKAGE.parent / "docs" / "architecture.md"

LAYERS = [  # lowest first; a module may import its own layer's modules and any lower layer's
    ("foundation", ("causal.errors", "causal.limits", "causal.files", "causal.locks", "causal.zoo")),
    ("language and models", ("causal.lang", "causal.models")),
    ("data", ("causal.data", "causal.tasks")),
    ("values", ("causal.values",)),
    ("metrics", ("causal.metrics",)),
    ("resolve", ("causal.resolve",)),
    ("methods", ("causal.methods",)),
    ("engine", ("causal.engine",)),
    ("results", ("causal.results",)),
    ("app", ("causal.app", "causal.conf", "causal.__main__", "causal")),
]


def layer_of(module: str) -> int:
    """The rank of the longest layer prefix naming the module."""
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md"
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every causal module `path` imports, wherever the import statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "causal"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "causal":
                continue
            for alias in node.names:  # `from causal import shards` imports the module causal.shards
                sub = f"{base}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path, module_name(path)) for path in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_layers():
    upward = [f"{source} (layer {LAYERS[layer_of(source)][0]}) imports {target} (layer {LAYERS[layer_of(target)][0]})"
              for source, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(source)]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_imports_inside_functions_and_type_checking(tmp_path):
    """The checker itself: a hidden import still counts."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from causal.engine.plan import Plan\n"
                      "def f():\n    from causal.app import cli\n    import causal.results.io\n")
    assert imports_of(source, "causal.values") == {"causal.engine.plan", "causal.app.cli", "causal.results.io"}
    assert layer_of("causal.app.cli") > layer_of("causal.values")


def test_architecture_doc_names_every_package_and_only_real_ones():
    """docs/architecture.md gives each package (and each top-level module) a paragraph, **`name/`** or
    **`name.py`**, and names nothing that does not exist."""
    import re
    named = set(re.findall(r"\*\*`([a-z_]+(?:/|\.py))`\*\*", DOC.read_text(encoding="utf-8")))
    packages = {f"{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert packages | modules <= named, f"not in docs/architecture.md: {sorted(packages | modules - named)}"
    assert named <= packages | modules, f"named but missing: {sorted(named - packages - modules)}"


def test_the_layer_table_in_the_doc_is_the_one_checked_here():
    text = DOC.read_text(encoding="utf-8")
    for name, prefixes in LAYERS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {name} |")), None)
        assert row, f"layer {name!r} has no row in docs/architecture.md"
        for prefix in prefixes:
            short = prefix.removeprefix("causal.") if prefix != "causal" else "causal"
            assert f"`{short}`" in row, f"{prefix} not in the {name!r} row"
