"""The package imports one way.

Every import counts: at module level, inside functions (which must never be used to hide a circle)
and under `if TYPE_CHECKING:` (a type-only import is still a dependency a reader has to follow).
Two graphs are checked: modules (no circle) and packages (no loop, and the layering below), where a
package is a sub-package of kd_lightning (`kd_lightning.losses`, `.data`, `.teachers`, `.callbacks`,
`.infra`, `.run`) or a top-level module (`kd_lightning.module`, `kd_lightning.tasks`, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"

# What a package may import besides itself: the bottom floors of the house.
MAY_IMPORT_ONLY = {
    "kd_lightning.infra": set(),  # infrastructure: used by everything above, uses nothing
    "kd_lightning.errors": set(),
    "kd_lightning.losses": {"kd_lightning.errors"},  # pure functions of tensors
    # LightningDataModules, tokenizers, vocabulary maps: from the losses only the pure alignment
    # (token_cuts, VocabMap) they build for the losses, never the losses themselves.
    "kd_lightning.data": {"kd_lightning.errors", "kd_lightning.infra", "kd_lightning.tasks", "kd_lightning.losses.align"},
}

# Who may import a package besides itself: the top floors.
MAY_BE_IMPORTED_ONLY_BY = {
    "kd_lightning.run": set(),  # the run layer reads the config and calls everything; nothing calls it
    "kd_lightning.callbacks": {"kd_lightning.run"},  # the module never imports a callback
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """`kd_lightning.<sub-package>` for a module inside one, else the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


FILES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def imports(tree: ast.AST, importer: str, modules: set[str]) -> set[str]:
    """kd_lightning modules imported anywhere in `tree`, `if TYPE_CHECKING:` blocks and functions included."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                anchor = importer.split(".") if importer in PACKAGES else importer.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base in modules:
                found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    return found - {importer}


def import_graph() -> dict[str, set[str]]:
    """Module -> the kd_lightning modules it imports (type-only and function-level imports included)."""
    modules = set(FILES)
    return {name: imports(ast.parse(path.read_text()), name, modules) for name, path in FILES.items()}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for importer, targets in graph.items():
        packages.setdefault(package_of(importer), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(importer))
    return packages


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


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that breaks `MAY_IMPORT_ONLY` or `MAY_BE_IMPORTED_ONLY_BY`, as a sentence naming it."""
    found = []
    for importer, targets in sorted(graph.items()):
        own = package_of(importer)
        for target in sorted(targets):
            theirs = package_of(target)
            if theirs == own:
                continue
            allowed = MAY_IMPORT_ONLY.get(own)
            if allowed is not None and theirs not in allowed and target not in allowed:
                found.append(f"{importer} imports {target}: {own} may import only {sorted(allowed) or 'nothing else'}")
            importers = MAY_BE_IMPORTED_ONLY_BY.get(theirs)
            if importers is not None and own not in importers:
                found.append(f"{importer} imports {target}: {theirs} may be imported only by {sorted(importers) or 'nothing else'}")
    return found


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert "kd_lightning.run.pipeline" in graph and "kd_lightning.run.distill" in graph["kd_lightning.run.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_type_checking_and_function_imports_count() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kd_lightning.module import DistillationModule\n"
              "def build():\n    import kd_lightning.data.dual\n    from kd_lightning.losses import align\n")
    assert imports(ast.parse(source), "kd_lightning.tasks", set(FILES)) == {
        "kd_lightning.module", "kd_lightning.data.dual", "kd_lightning.losses", "kd_lightning.losses.align"}
    assert imports(ast.parse("from .tokenizer import eos_id\nfrom . import dual\n"), "kd_lightning.data.base",
                   set(FILES)) == {"kd_lightning.data.tokenizer", "kd_lightning.data", "kd_lightning.data.dual"}


def test_the_packages_import_one_way() -> None:
    packages = package_graph(import_graph())
    assert {"kd_lightning.losses", "kd_lightning.data", "kd_lightning.teachers", "kd_lightning.callbacks",
            "kd_lightning.infra", "kd_lightning.run", "kd_lightning.module"} <= set(packages)
    cycle = find_cycle(packages)
    assert cycle is None, "loop between packages: " + " -> ".join(cycle or [])


def test_the_layering_holds() -> None:
    violations = layering_violations(import_graph())
    assert not violations, "\n".join(violations)


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    graph = import_graph()
    graph["kd_lightning.run.settings"] = graph["kd_lightning.run.settings"] | {"kd_lightning.run.pipeline"}  # config -> pipeline -> ... -> config
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "kd_lightning.run.settings" in cycle


def test_a_planted_package_loop_is_found_and_named() -> None:
    # The loop this house removed: losses/align.py reading tokenizers from data/tokenizer.py.
    graph = import_graph()
    graph["kd_lightning.losses.align"] = graph["kd_lightning.losses.align"] | {"kd_lightning.data.tokenizer"}
    cycle = find_cycle(package_graph(graph))
    assert cycle is not None and {"kd_lightning.losses", "kd_lightning.data"} <= set(cycle)
    assert find_cycle(graph) is None  # no circle between modules: only the package graph sees it
    assert layering_violations(graph) == [
        "kd_lightning.losses.align imports kd_lightning.data.tokenizer: kd_lightning.losses may import only "
        "['kd_lightning.errors']"]
    graph["kd_lightning.teachers.store"] = graph["kd_lightning.teachers.store"] | {"kd_lightning.callbacks.sar"}
    assert any(v.startswith("kd_lightning.teachers.store imports kd_lightning.callbacks.sar: kd_lightning.callbacks "
                            "may be imported only by") for v in layering_violations(graph))


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
