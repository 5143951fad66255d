"""README's two set-up commands each install what they need, whichever runs first (issue 22).

``make demo`` once depended on ``setup`` alone, so on a fresh clone the demo's evaluation found no
js-md5 (only ``make test`` ran ``scripts/install_toolchains.sh``). These tests read what make would
run (``make -n``, nothing executed) and the order ``.ci/run`` runs README's commands in.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as REPO


def _dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands ``make TARGET`` would run on a machine without a venv (``VENV`` in tmp_path)."""
    out = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _index(lines: list[str], needle: str) -> int:
    hits = [i for i, line in enumerate(lines) if needle in line]
    assert hits, f"{needle!r} not among the commands: {lines}"
    return hits[0]


@pytest.mark.parametrize("target, runs", [("demo", "scripts/demo.sh"), ("test", "bin/pytest -q")])
def test_each_setup_command_installs_python_deps_and_toolchains_first(target: str, runs: str,
                                                                      tmp_path: Path) -> None:
    lines = _dry_run(target, tmp_path)
    venv = _index(lines, "-m venv")
    toolchains = _index(lines, "scripts/install_toolchains.sh")
    assert venv < toolchains < _index(lines, runs)


def test_ci_runs_readme_commands_in_a_new_users_order() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip().startswith("make ")]
    assert commands == ["make demo", "make test", "make test-long", "make test-cluster"]
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test " in readme
