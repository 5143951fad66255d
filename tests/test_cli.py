"""The CLI surface: light imports, --help everywhere, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from octoray.cli import VERBS
from tests.helpers import run_cli

HEAVY = ("torch", "transformers", "deepspeed", "ray")


def test_import_octoray_is_light() -> None:
    code = ("import sys, octoray, octoray.cli, octoray.config, octoray.storage.stage_dirs; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_top_level_help_lists_every_verb() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb: str) -> None:
    result = run_cli(verb, "--help")
    assert result.returncode == 0, result.stderr
    assert f"octoray {verb}" in result.stdout


def test_unknown_verb_exits_2() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
