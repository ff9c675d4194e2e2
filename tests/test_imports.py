"""The shape of the package: no module over 350 lines, and no import loop: no module imports, at its top
or inside a function, one that imports it back (directly or through others). Imports under `if
TYPE_CHECKING:` only name types and do not count. A loop hides which module is the lower one, and a lazy
import that closes a loop is a loop that only shows at run time."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "cartridges": ROOT / "cartridges",
    "cartridges.stages": ROOT / "stages",
    "cartridges.pipeline": ROOT / "pipeline",
    "cartridges.bench": ROOT / "bench",
}
SIZED = ("cartridges/", "stages/", "pipeline/")  # the product's modules; bench scripts may run longer


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _with_packages(name: str) -> set[str]:
    """Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first: those are imports too."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)}


def _runtime_nodes(tree: ast.AST):
    """Every node, except the bodies of `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (child for other in node.orelse for child in [other, *_runtime_nodes(other)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        imported = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        imported = {package for other in imported for package in _with_packages(other)}
        graph[name] = {other for other in imported if other in known and other not in (name, "cartridges")}
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_loop():
    graph = import_graph()
    assert len(graph) > 80
    assert "cartridges.registry.listing" in graph["cartridges.registry.store"]  # a function-level import counts
    assert "cartridges.registry.store" not in graph["cartridges.registry.listing"]  # a TYPE_CHECKING one does not
    assert loops(graph) == []


def test_the_loop_finder_finds_a_lazy_loop():
    """It can fail: a function-level import back is a loop."""
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_350_lines():
    """Small modules with one job: past 350 lines a module has grown a second one (split it)."""
    sizes = {
        name: len(path.read_text().splitlines())
        for name, path in modules().items()
        if path.relative_to(ROOT).as_posix().startswith(SIZED)
    }
    assert len(sizes) > 80
    assert {name: lines for name, lines in sizes.items() if lines > 350} == {}
