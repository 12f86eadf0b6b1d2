"""Imports never run upward through the layers, and no modules import each other in a circle.

Every `import` in src/sslbackdoor counts: module level, inside functions (a lazy import
still couples the modules) and under `if TYPE_CHECKING:` (a type names its layer too).
The layers, bottom up, are docs/design.md's "Layers"; `LAYERS` places every module, and a
module it does not place fails the test, so a new module has to be given its layer.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# layer → (rank, modules). "pkg.*" places every module of a package; a module listed by its
# own name wins over its package. Layers of one rank are siblings and do not import each other.
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "core": (0, ("sslbackdoor", "sslbackdoor.errors", "sslbackdoor.engine", "sslbackdoor.config_io",
                 "sslbackdoor.training_state", "sslbackdoor.progress", "sslbackdoor.run_lock")),
    "data": (1, ("sslbackdoor.data.*",)),
    "models": (2, ("sslbackdoor.models.*",)),
    "evaluation": (3, ("sslbackdoor.downstream.*", "sslbackdoor.metrics")),
    "pretraining": (4, ("sslbackdoor.ssl.*",)),
    "attacks": (5, ("sslbackdoor.attacks.*",)),
    "defenses": (5, ("sslbackdoor.defenses.*",)),
    "reports": (6, ("sslbackdoor.report", "sslbackdoor.grid_report", "sslbackdoor.paper",
                    "sslbackdoor.attacks.poisoning_report", "sslbackdoor.attacks.seed_summary")),
    "experiments": (7, ("sslbackdoor.experiment", "sslbackdoor.config", "sslbackdoor.runners",
                        "sslbackdoor.grid", "sslbackdoor.zero_shot_stage",
                        "sslbackdoor.attacks.poisoning_experiment", "sslbackdoor.defenses.experiment")),
    "cli": (8, ("sslbackdoor.cli", "sslbackdoor.__main__", "sslbackdoor.ssl.cli",
                "sslbackdoor.attacks.cli", "sslbackdoor.defenses.cli")),
}

# Upward imports not fixed yet, each with the fix it waits for: (importer, imported).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# A registry importing the modules that register into it, so that looking a name up finds
# them (vissl's import_all_modules): the plugin depends on the registry, not the reverse,
# so these edges are not cycles. They still obey the layers.
DISCOVERY: set[tuple[str, str]] = {
    ("sslbackdoor.data.datasets", f"sslbackdoor.data.{plugin}")
    for plugin in ("folder_sources", "offline", "plain_sources", "torchvision_sources")
} | {("sslbackdoor.models.encoders", "sslbackdoor.models.clip")}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} → {self.imported}"


def modules(src: Path, package: str = "sslbackdoor") -> dict[str, Path]:
    """Dotted module name → file, for every module of `package` under `src`."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")[:None if is_package else -1]
    base = base[:len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in known)
    else:
        base = _absolute(node, importer, is_package)
        for alias in node.names:
            # `from pkg import module` imports the module; `from module import name`, the module.
            submodule = f"{base}.{alias.name}"
            if submodule in known:
                yield submodule
            elif base in known:
                yield base


def imports(src: Path, package: str = "sslbackdoor") -> list[Import]:
    """Every import of a module of `package` by another, wherever in the file it stands."""
    known = modules(src, package)
    found = set()
    for importer, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        nodes = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
        for node in nodes:
            for imported in _targets(node, importer, path.name == "__init__.py", known):
                if imported != importer:
                    found.add(Import(importer, imported, node.lineno))
    return sorted(found, key=lambda i: (i.importer, i.line, i.imported))


def layer_of(module: str, layers: dict[str, tuple[int, tuple[str, ...]]] = LAYERS) -> str | None:
    """The layer placing `module` by name, else by its innermost listed package."""
    best: tuple[int, str] | None = None
    for layer, (_, members) in layers.items():
        for member in members:
            if member == module:
                return layer
            package = member.removesuffix(".*")
            inside = member.endswith(".*") and (module + ".").startswith(package + ".")
            if inside and (best is None or len(package) > best[0]):
                best = (len(package), layer)
    return best[1] if best else None


def upward(found: list[Import], layers: dict[str, tuple[int, tuple[str, ...]]] = LAYERS) -> list[Import]:
    """Imports of a higher layer, or of a sibling layer of the same rank."""
    bad = []
    for item in found:
        source, target = layer_of(item.importer, layers), layer_of(item.imported, layers)
        if source is None or target is None or source == target:
            continue
        if layers[target][0] >= layers[source][0]:
            bad.append(item)
    return bad


@dataclass(frozen=True)
class Cycle:
    modules: list[str]  # every module of a group that import each other in a circle
    example: list[str]  # one shortest circle through the first: a → b → … → a

    def __str__(self) -> str:
        return f"{' → '.join(self.example)} ({len(self.modules)} modules: {', '.join(self.modules)})"


def cycles(found: list[Import], ignore: Collection[tuple[str, str]] = ()) -> list[Cycle]:
    """The groups of modules that import each other in a circle."""
    graph: dict[str, set[str]] = {}
    for item in found:
        if (item.importer, item.imported) not in ignore:
            graph.setdefault(item.importer, set()).add(item.imported)
    return [Cycle(sorted(group), _cycle_through(group, graph))
            for group in _strongly_connected(graph) if len(group) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def _cycle_through(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, set()) & group):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not strongly connected")


# --- the project -------------------------------------------------------------------------

PROJECT = imports(SRC)


def test_every_module_has_a_layer() -> None:
    unplaced = [module for module in modules(SRC) if layer_of(module) is None]
    assert unplaced == [], f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_no_import_runs_upward() -> None:
    bad = upward(PROJECT)
    unexpected = [str(item) for item in bad if (item.importer, item.imported) not in ALLOWED_UPWARD]
    fixed = sorted(set(ALLOWED_UPWARD) - {(item.importer, item.imported) for item in bad})
    print(f"{len(PROJECT)} imports between {len(modules(SRC))} modules; {len(bad)} upward, "
          f"{len(bad) - len(unexpected)} of them allowed (TODO)")
    assert unexpected == [], "imports against the layers (importer:line → imported):\n" + "\n".join(unexpected)
    assert fixed == [], f"fixed: remove these from ALLOWED_UPWARD: {fixed}"


def test_no_import_cycle() -> None:
    found = cycles(PROJECT, ignore=DISCOVERY)
    print(f"{len(found)} import cycles")
    assert found == [], "modules importing each other in a circle:\n" + "\n".join(map(str, found))


def test_discovery_edges_exist() -> None:
    # A stale exemption would silently excuse that import, and a circle through it, if it came back.
    edges = {(item.importer, item.imported) for item in PROJECT}
    assert sorted(DISCOVERY - edges) == []


# --- the checker itself, on a made-up package --------------------------------------------

TOY_LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "low": (0, ("toy", "toy.base")),
    "left": (1, ("toy.left.*",)),
    "right": (1, ("toy.right.*",)),
    "top": (2, ("toy.top", "toy.left.runner")),
}


def write_toy(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"toy/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_lazy_type_only_and_relative_imports_are_found(tmp_path: Path) -> None:
    src = write_toy(tmp_path, {
        "toy/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.top import X\n",
        "toy/top.py": "def f():\n    from toy import base\n",
        "toy/left/__init__.py": "",
        "toy/left/a.py": "from . import b\nfrom .b import name\nimport toy.base\n",
        "toy/left/b.py": "import os\n",
    })
    found = {(i.importer, i.imported) for i in imports(src, "toy")}
    assert found == {("toy.base", "toy.top"), ("toy.top", "toy.base"),
                     ("toy.left.a", "toy.left.b"), ("toy.left.a", "toy.base")}


def test_upward_sibling_and_listed_module_are_told_apart(tmp_path: Path) -> None:
    src = write_toy(tmp_path, {
        "toy/base.py": "",
        "toy/top.py": "import toy.base\n",
        "toy/left/__init__.py": "", "toy/right/__init__.py": "",
        "toy/left/a.py": "import toy.base\nimport toy.right.c\n",
        "toy/left/runner.py": "import toy.left.a\n",
        "toy/right/c.py": "def f():\n    import toy.top\n",
    })
    bad = {(i.importer, i.imported) for i in upward(imports(src, "toy"), TOY_LAYERS)}
    assert bad == {("toy.left.a", "toy.right.c"), ("toy.right.c", "toy.top")}
    assert layer_of("toy.left.runner", TOY_LAYERS) == "top"
    assert layer_of("toy.other", TOY_LAYERS) is None
    assert layer_of("toyish", TOY_LAYERS) is None


def test_cycles_are_reported_as_paths(tmp_path: Path) -> None:
    src = write_toy(tmp_path, {
        "toy/base.py": "import toy.top\n",
        "toy/top.py": "def f():\n    import toy.mid\n",
        "toy/mid.py": "import toy.base\n",
        "toy/leaf.py": "import toy.base\n",
    })
    found = imports(src, "toy")
    assert [c.example for c in cycles(found)] == [["toy.base", "toy.top", "toy.mid", "toy.base"]]
    assert cycles(found)[0].modules == ["toy.base", "toy.mid", "toy.top"]
    assert cycles(found, ignore={("toy.top", "toy.mid")}) == []


@pytest.mark.parametrize(("module", "layer"), [
    ("sslbackdoor.data.sources", "data"), ("sslbackdoor.attacks.seed_summary", "reports"),
    ("sslbackdoor.attacks.cli", "cli"), ("sslbackdoor", "core"), ("sslbackdoor.unplaced", None)])
def test_project_table_places_by_name_before_package(module: str, layer: str | None) -> None:
    assert layer_of(module) == layer
