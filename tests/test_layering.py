"""The package's layering: the shapes world (`flow_trl.toy`) is a leaf that no library module depends on, and the
module-level imports of `flow_trl` form no cycle.

"Library" is every module of `flow_trl` except the toy world itself and the command-line layer (`flow_trl.cli`,
`flow_trl.scripts.*`), which runs the shapes recipes.
"""

import ast
import subprocess
import sys
from pathlib import Path

import flow_trl


PACKAGE_DIR = Path(flow_trl.__file__).parent
NOT_LIBRARY = ("flow_trl.toy", "flow_trl.cli", "flow_trl.scripts")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_library(name: str) -> bool:
    return not any(in_package(name, other) for other in NOT_LIBRARY)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str) -> set[str]:
    """The `flow_trl` modules an import statement of module `importer` names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    found = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in MODULES:  # `from package import submodule`
            found.add(submodule)
        elif base in MODULES:
            found.add(base)
    return found


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: not inside functions or classes, nor under
    ``if TYPE_CHECKING:``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for succ in sorted(graph[node]):
            if state.get(succ) == "open":
                return stack[stack.index(succ):] + [succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_the_named_modules():
    tree = ast.parse("from ..images import save_image_grid\nfrom . import geneval\nfrom .base import RewardModel")
    found = set().union(*(imported_modules(node, "flow_trl.rewards.detection") for node in tree.body))
    assert found == {"flow_trl.images", "flow_trl.rewards.geneval", "flow_trl.rewards.base"}


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, function-level ones included."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph(statements=module_level_imports) -> dict[str, set[str]]:
    """``{module: the flow_trl modules it imports}`` over the import statements that `statements` picks."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set().union(set(), *(imported_modules(node, name) for node in statements(tree)))
    return graph


def test_module_level_imports_of_flow_trl_form_no_cycle():
    graph = import_graph()
    assert graph["flow_trl.toy.world"] >= {"flow_trl.rewards.geneval"}  # the graph sees relative imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_toy_world_imports_form_no_cycle_even_inside_functions():
    graph = {name: {m for m in imported if in_package(m, "flow_trl.toy")}
             for name, imported in import_graph(all_imports).items() if in_package(name, "flow_trl.toy")}
    assert graph["flow_trl.toy.evaluation"] >= {"flow_trl.toy.scorer"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_library_module_imports_the_toy_world_at_any_level():
    offenders = []
    for name, path in MODULES.items():
        if is_library(name):
            for node in all_imports(ast.parse(path.read_text(), filename=str(path))):
                toy = [m for m in imported_modules(node, name) if in_package(m, "flow_trl.toy")]
                offenders += [f"{name} (line {node.lineno}) imports {m}" for m in toy]
    assert not offenders, "library modules must not depend on flow_trl.toy:\n" + "\n".join(offenders)


def test_importing_every_library_module_leaves_the_toy_world_unimported():
    library = sorted(name for name in MODULES if is_library(name))
    code = (
        "import importlib, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'flow_trl.toy' or m.startswith('flow_trl.toy.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing the library imported {result.stdout.strip()}"
    assert {"flow_trl.rewards", "flow_trl.trainer.model_card", "flow_trl.images"} <= set(library)
