"""Every preset in jobs/ parses, names its command in a header comment, and each stage section loads
into that stage's config class (for every stage whose module exists in this build)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from octoray.cli import VERBS
from octoray.config import STAGE_SECTIONS, load_config, read_yaml
from tests.helpers import REPO_ROOT

PRESETS = sorted((REPO_ROOT / "jobs").glob("*.yaml")) + sorted((REPO_ROOT / "jobs").glob("*.yml"))


def sections(path: Path) -> list[str]:
    return [key for key in read_yaml(path) if key in STAGE_SECTIONS]


def test_presets_exist() -> None:
    names = {p.name for p in PRESETS}
    assert {"demo.yaml", "octocoder.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_header_names_the_command(path: Path) -> None:
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("octoray " in line for line in header), f"{path.name}: header comment must hold the exact command"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_sections_are_known(path: Path) -> None:
    unknown = [key for key in read_yaml(path) if key not in STAGE_SECTIONS]
    assert not unknown, f"{path.name}: top-level keys {unknown} are not stage sections {STAGE_SECTIONS}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_sections_load_into_their_stage_config(path: Path, tmp_path: Path) -> None:
    """Each section loads into its stage's config, wired to its input the way the pipeline wires it."""
    from octoray.pipeline import run as pipeline
    present = [s for s in sections(path) if s in pipeline.STAGES]
    base = load_config(pipeline.PipelineConfig, path, section="pipeline")
    wanted = tuple(s for s in pipeline.STAGES if s in present or (s == "serve" and "eval" in present))
    configs = pipeline.stage_configs(path, {}, dataclasses.replace(base, stages=wanted),
                                     {s: tmp_path / s for s in pipeline.STAGES})  # ConfigError on any problem
    for section in present:
        module = importlib.import_module(VERBS[section][0])
        assert isinstance(configs[section], module.CONFIG), section
    assert configs, f"{path.name}: no section could be checked"
