"""The package imports one way: no circle between its modules, counting imports inside functions
(which must never be used to hide one) and leaving out `if TYPE_CHECKING:` blocks."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """kd_lightning modules imported anywhere in `tree`, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: runtime_imports(ast.parse(path.read_text()), modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert "kd_lightning.run.pipeline" in graph and "kd_lightning.run.distill" in graph["kd_lightning.run.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    graph = import_graph()
    graph["kd_lightning.run.settings"] = graph["kd_lightning.run.settings"] | {"kd_lightning.run.pipeline"}  # config -> pipeline -> ... -> config
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "kd_lightning.run.settings" in cycle


def test_stages_are_dispatched_in_one_place_and_config_helpers_are_a_leaf() -> None:
    """The config readers (`run.settings`) import no other module of the run package (they build the
    typed options of the packages below it); the package itself (`CONFIG_DIR`, what the CLI imports
    before `--help`) imports nothing from kd_lightning."""
    from kd_lightning.run.pipeline import STAGES

    assert set(STAGES) == {"distill", "teacher", "takd", "cache_teacher"}
    graph = import_graph()
    assert not {m for m in graph["kd_lightning.run.settings"] if m.startswith("kd_lightning.run")}
    assert not {m for m in graph["kd_lightning.run"] if m.startswith("kd_lightning")}


def test_nothing_below_the_run_layer_reads_the_hydra_config() -> None:
    """Only `kd_lightning.run` receives the Hydra config: no module below it imports omegaconf."""
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path).startswith("kd_lightning.run"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] in ("omegaconf", "hydra") for name in names):
                readers.append(module_name(path))
    assert not readers, f"modules below kd_lightning.run that read the config: {sorted(set(readers))}"
