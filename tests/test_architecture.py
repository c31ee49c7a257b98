"""The package's shape (docs/architecture.md): every module in one layer, imports only go down, no
cycles, no module over ~600 lines. Read from the source with ``ast``, lazy imports included.

Imports under ``if TYPE_CHECKING:`` count for the layers but not for cycles: they never run, and
the one kind the package has is a part typed with the Trainer that owns it (trainkit.loop's
policies and payload take the Trainer they belong to).

The lists of known exceptions below are what is left to move; each must only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trainkit"

# Layers, bottom to top: a module may import its own layer and those below it.
LAYERS: dict[str, tuple[str, ...]] = {
    "library": (
        "",  # the package's __init__: __version__ and the public names, imported lazily by name
        "errors", "exits", "choices", "faults", "devices", "precision",  # foundations
        "config", "config.*", "data", "data.*", "tasks", "tasks.*", "optim", "optim.*", "nn", "nn.*",
        "distributed", "distributed.*", "checkpoint", "checkpoint.*", "tracking", "tracking.*", "loop", "loop.*",
        "doctor", "doctor.*",
    ),
    "recipes": ("recipes", "recipes.*"),
    "tools": ("tune", "tune.*", "experiments", "experiments.*", "profiling"),
    "app": ("cli", "entry", "__main__"),
}  # fmt: skip
KNOWN_UPWARD: set[tuple[str, str]] = set()  # (importer, imported) pairs still to remove
MAX_LINES = 600
KNOWN_LONG: set[str] = set()  # modules still to split


def module_files() -> dict[str, Path]:
    """Module name (relative to trainkit, "" for the package) -> its file."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path], *, type_only: bool = True) -> set[str]:
    """The trainkit modules ``name`` imports anywhere in its file (top level, functions, and unless
    ``type_only`` is False, under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    skipped = set() if type_only else {id(node) for block in ast.walk(tree) if is_type_checking_block(block)
                                       for child in block.body for node in ast.walk(child)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = ["trainkit", *package.split(".")] if package else ["trainkit"]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # an imported name is a module of its own (from trainkit import devices) or one of base's names
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}".removeprefix("trainkit.") in modules
                       else base for alias in node.names]  # fmt: skip
        for target in targets:
            if target == "trainkit" or target.startswith("trainkit."):
                found.add(owning_module(target.removeprefix("trainkit").lstrip("."), modules))
    found.discard(name)
    return found


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def owning_module(dotted: str, modules: dict[str, Path]) -> str:
    while dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted


def layer_of(name: str) -> int:
    for index, members in enumerate(LAYERS.values()):
        for member in members:
            if name == member or (member.endswith(".*") and name.startswith(member[:-1])):
                return index
    raise AssertionError(f"trainkit.{name} is in no layer: add it to LAYERS and docs/architecture.md")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


@pytest.fixture(scope="module")
def runtime_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules, type_only=False) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_reader_sees_lazy_and_relative_imports():
    modules = module_files()
    assert "tune.trials" in imports_of("tune", modules["tune"], modules)  # inside a function
    assert "errors" in imports_of("config.schema", modules["config.schema"], modules)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_reader_can_leave_out_type_only_imports():
    modules = module_files()
    assert "loop.trainer" in imports_of("loop.nonfinite", modules["loop.nonfinite"], modules)
    assert "loop.trainer" not in imports_of("loop.nonfinite", modules["loop.nonfinite"], modules, type_only=False)


def test_no_module_imports_its_way_back_to_itself(runtime_graph):
    assert cycles(runtime_graph) == []


def test_every_module_imports_only_its_layer_and_those_below(graph):
    upward = {(name, other) for name, imported in graph.items() for other in imported
              if layer_of(other) > layer_of(name)}  # fmt: skip
    assert upward - KNOWN_UPWARD == set(), "move the code down, or the importer up (docs/architecture.md)"
    assert KNOWN_UPWARD - upward == set(), "an exception that no longer exists: remove it from KNOWN_UPWARD"


def test_no_module_is_longer_than_a_sitting(graph):
    long = {name for name, path in module_files().items() if len(path.read_text().splitlines()) > MAX_LINES}
    assert long - KNOWN_LONG == set()
    assert KNOWN_LONG - long == set(), "split: remove it from KNOWN_LONG"
