"""Every benchmark in benchmarks/ still imports what it names from octoray and tests/.

The benchmarks are run by hand (BENCHMARKS.md gives each command), so nothing else notices when a
move of the house leaves one importing a module that is gone; this reads their imports (function
level included) without running them, so it stays in the fast tier.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

BENCHMARKS = sorted((REPO_ROOT / "benchmarks").glob("*.py"))
OURS = ("octoray", "tests")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import of octoray or tests in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] in OURS]
    return found


def test_there_are_benchmarks() -> None:
    assert len(BENCHMARKS) >= 10


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path: Path) -> None:
    problems = []
    for module_name, names, line in _imports(path):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"{path.name}:{line}: {module_name}: {exc}")
            continue
        for name in names:
            if not hasattr(module, name):
                try:  # a submodule imported by name (from tests.helpers import s3server)
                    importlib.import_module(f"{module_name}.{name}")
                except ImportError:
                    problems.append(f"{path.name}:{line}: {module_name} has no {name}")
    assert not problems, "\n".join(problems)
