"""Config loading: defaults < YAML < overrides, every problem at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from octoray.config import ConfigError, load_config, option, split_overrides
from octoray.errors import UserError


@dataclass(frozen=True)
class Example:
    lr: float = option(5e-4, "learning rate")
    steps: int = option(35, "optimizer steps")
    zero: Literal[2, 3] = option(2, "ZeRO stage")
    langs: tuple[str, ...] = option(("python",), "languages")
    name: str | None = option(None, "run name")
    lora: bool = option(False, "use LoRA")

    def problems(self) -> list[str]:
        return ["steps must be positive"] if self.steps <= 0 else []


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-3\nsteps: 10\n")
    cfg = load_config(Example, path, ["steps=20", "langs=python,go"], values={"name": "x", "lr": None})
    assert (cfg.lr, cfg.steps, cfg.langs, cfg.name) == (1e-3, 20, ("python", "go"), "x")


def test_sectioned_file_reads_its_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nmine:\n  workers: 3\n")
    assert load_config(Example, path, section="train").steps == 7


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Example, None, ["stpes=1", "lr=fast", "zero=4", "lora=maybe"])
    message = str(err.value)
    assert "unknown key 'stpes' (did you mean 'steps'?)" in message
    assert "lr: expected a number" in message and "zero: expected one of 2, 3" in message
    assert "lora: expected true or false" in message
    assert "\n" not in message


def test_class_check_runs_after_types() -> None:
    with pytest.raises(ConfigError, match="steps must be positive"):
        load_config(Example, None, ["steps=0"])


def test_yaml_string_number_is_a_float() -> None:
    assert load_config(Example, None, ["lr=5e-4"]).lr == 5e-4


def test_missing_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(Example, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Example, bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 1\nother: 2\ntrain: 3\n")
    with pytest.raises(UserError, match=r"key 'train' appears twice \(line 4\)"):
        load_config(Example, twice)


def test_split_overrides_keeps_urls() -> None:
    pos, ov = split_overrides(["https://h/x?a=b", "repo", "workers=2", "a.b=3"])
    assert pos == ["https://h/x?a=b", "repo"] and ov == ["workers=2", "a.b=3"]
