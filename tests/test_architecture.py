"""The shape of the house (docs/architecture.md): rooms, leaves, no cycles, small modules.

Read from the source with :mod:`ast`, nothing imported: imports inside functions count too, since a
lazy import is still a dependency (and a cycle through one is a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "octoray"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_ENTRIES = 15

#: Each stage's config module, which must import nothing from its own stage family.
CONFIG_LEAVES = {
    "octoray.data.mine_config": "octoray.data",
    "octoray.data.filter_config": "octoray.data",
    "octoray.training.train_config": "octoray.training",
    "octoray.training.tune_config": "octoray.training",
    "octoray.serving.config": "octoray.serving",
    "octoray.evaluation.config": "octoray.evaluation",
    "octoray.pipeline.config": "octoray.pipeline",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every octoray import in module ``name``, lazy ones included."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("octoray")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name if _is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base.startswith("octoray"):
                found += [(base, alias.name) for alias in node.names]
    return found


def _edges(name: str) -> set[str]:
    """The octoray modules ``name`` depends on: a ``from pkg import sub`` names the submodule."""
    edges = set()
    for module, imported in _imports(name):
        target = f"{module}.{imported}" if imported and f"{module}.{imported}" in MODULES else module
        if target in MODULES and target != name:
            edges.add(target)
    return edges


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: _edges(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return components


def test_no_import_cycles_lazy_imports_included() -> None:
    assert _cycles() == []


def test_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: two modules importing each other lazily are one cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from octoray.b import g\n")
    (tmp_path / "b.py").write_text("import octoray.a\n")
    monkeypatch.setitem(MODULES, "octoray.a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "octoray.b", tmp_path / "b.py")
    assert ["octoray.a", "octoray.b"] in _cycles()


@pytest.mark.parametrize("leaf, family", sorted(CONFIG_LEAVES.items()))
def test_each_stage_config_is_a_leaf_of_its_family(leaf: str, family: str) -> None:
    own = sorted(m for m in _edges(leaf) if m == family or m.startswith(family + "."))
    assert own == [], f"{leaf} imports {own} from its own stage family"


def test_no_private_name_is_imported_across_modules() -> None:
    crossing = [f"{name} imports {module}.{imported}" for name in MODULES for module, imported in _imports(name)
                if imported and imported.startswith("_") and not imported.startswith("__") and module != name]
    assert crossing == []


def test_top_level_is_small() -> None:
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= MAX_TOP_LEVEL_ENTRIES, entries


def test_no_module_is_long() -> None:
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_long() -> None:
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = length
    assert long == {}


def test_tests_mirror_the_package() -> None:
    """Every folder of tests/ (but helpers/) is a room of octoray/, so a module's tests are found
    where the module is."""
    tests = Path(__file__).resolve().parent
    rooms = {p.relative_to(tests).as_posix() for p in tests.rglob("*") if p.is_dir()
             and p.name != "__pycache__" and p.relative_to(tests).parts[0] != "helpers"}
    assert {room for room in rooms if not (PACKAGE / room / "__init__.py").is_file()} == set()
